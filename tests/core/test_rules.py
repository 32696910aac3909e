"""Rules written once in core and used by every backend: quarantine outcome, password scrubbing."""

from __future__ import annotations

import pytest

from skunkqueue import policy
from skunkqueue.record import ERROR
from skunkqueue.urls import redact, scrub


def test_a_quarantined_record_is_a_dead_malformed_record_error() -> None:
    outcome = policy.quarantined("record 'x' has unreadable JSON")
    assert (outcome.state, outcome.dead) == (ERROR, True)
    assert outcome.error == {"type": "MalformedRecord", "message": "record 'x' has unreadable JSON", "traceback": ""}


@pytest.mark.parametrize(("url", "message", "secrets"), [
    ("redis://:s3cret@host:6379", "auth failed for s3cret", ["s3cret"]),
    # Drivers quote the password percent-decoded as well as as given.
    ("mongodb://user:p%40ss%3Aw0rd@host/?authSource=admin", "bad password p@ss:w0rd (sent p%40ss%3Aw0rd)",
     ["p@ss:w0rd", "p%40ss%3Aw0rd", "w0rd"]),
    # An unescaped '@' inside the password: no piece of it may stay behind.
    ("redis://user:p@ss:w0rd@host", "AUTH p@ss:w0rd refused", ["p@ss", "w0rd"]),
    ("user:topsecret@host:27017", "topsecret was rejected", ["topsecret"]),
])
def test_scrub_leaves_no_piece_of_the_password_in_a_driver_message(url: str, message: str,
                                                                    secrets: list[str]) -> None:
    cleaned = scrub(message, url)
    assert "***" in cleaned
    assert [s for s in secrets if s in cleaned] == []


@pytest.mark.parametrize("url", [None, "", "redis://host:6379", "mongodb://host/?appname=a"])
def test_scrub_without_a_password_changes_nothing(url: str | None) -> None:
    assert scrub("Cannot reach host:6379 (appname=a)", url) == "Cannot reach host:6379 (appname=a)"


def test_redact_and_scrub_agree_on_an_ordinary_address() -> None:
    url = "redis://alice:hunter2@cache.example:6380/0"
    assert redact(url) == "redis://alice:***@cache.example:6380/0"
    assert scrub(f"error talking to {url}", url) == f"error talking to {redact(url)}"
