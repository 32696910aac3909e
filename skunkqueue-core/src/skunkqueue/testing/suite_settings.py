"""The Settings role on its own: part of the conformance suite (mixed into ConformanceSuite).

Periodic schedules, route limits and pauses and the signing policy all keep their state
with ``get_setting``/``put_setting``; the parts of the kit for those features use the
role, this part holds a backend to what the role itself promises
(:class:`skunkqueue.persistence.roles.Settings`): the value last put under a name, for
this queue, whatever characters name and value hold; ``None`` deletes; last writer wins.
In-process, any OS. Skipped, saying why, for a backend that does not implement the role.
"""

from __future__ import annotations

import threading

import pytest

from skunkqueue.persistence import Persistence
from skunkqueue.testing.kit import BackendUnderTest

# Names the core writes look like these (``flow:pause:ROUTE``, ``periodic:NAME:last``) with a
# user's route or job name inside: every character must be kept, and no two names may meet.
NAMES = ["a", "a:b", "a.b", "a:b:c", "{a}", "{}", "}{", "$a", "*", "a b", "a/b", "%3A", "a\\b", "'a\"",
         "ünï-日本-🦨", "flow:pause:{r}:$x", "x" * 200]
VALUES = ["", "0", "1", "{\"json\": [1, 2.5, null]}", "{}:$.*", "ünï-日本-🦨", "line\nbreak", "v" * 65_536]


def _needs_settings(store: Persistence) -> None:
    if not store.supports_settings:
        pytest.skip(f"the {store.name} backend keeps no settings (it does not implement get_setting and put_setting)")


class SettingsSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_a_setting_is_the_value_last_put_and_none_deletes_it(self, store: Persistence) -> None:
        _needs_settings(store)
        assert store.get_setting("kit") is None
        store.put_setting("kit", None)  # deleting what is not there is no error
        store.put_setting("kit", "1")
        store.put_setting("kit", "2")
        assert store.get_setting("kit") == "2"
        store.put_setting("kit", "")
        assert store.get_setting("kit") == "", "an empty value is a value, not a deletion"
        store.put_setting("kit", None)
        assert store.get_setting("kit") is None
        store.put_setting("kit", "3")
        assert store.get_setting("kit") == "3"

    def test_settings_keep_every_character_and_no_two_names_meet(self, store: Persistence) -> None:
        _needs_settings(store)
        expected = {name: VALUES[i % len(VALUES)] + f"#{i}" for i, name in enumerate(NAMES)}
        for name, value in expected.items():
            store.put_setting(name, value)
        assert {name: store.get_setting(name) for name in NAMES} == expected
        for value in VALUES:
            store.put_setting("kit-value", value)
            assert store.get_setting("kit-value") == value
        store.put_setting("a:b", None)
        assert store.get_setting("a:b") is None
        assert [store.get_setting(name) for name in ("a", "a.b", "a:b:c")] == \
            [expected["a"], expected["a.b"], expected["a:b:c"]]

    def test_settings_belong_to_their_queue_and_every_connection_sees_them(
            self, store: Persistence, backend: BackendUnderTest, queue_name: str) -> None:
        _needs_settings(store)
        store.put_setting("kit-shared", "here")
        with backend.open(queue_name) as same, backend.open(backend.new_queue_name()) as other:
            assert same.get_setting("kit-shared") == "here"
            assert other.get_setting("kit-shared") is None
            other.put_setting("kit-shared", "there")
            same.put_setting("kit-shared", "again")
            assert other.get_setting("kit-shared") == "there"
        assert store.get_setting("kit-shared") == "again"

    def test_concurrent_writers_each_keep_their_own_and_the_last_writer_wins(
            self, store: Persistence, backend: BackendUnderTest, queue_name: str) -> None:
        """Pools on many hosts write settings at once (schedules' last slots, limits): 6 connections
        write 30 times each, to a name of their own and to one they share."""
        _needs_settings(store)
        writers, rounds = 6, 30
        errors: list[BaseException] = []
        start = threading.Barrier(writers)

        def write(n: int) -> None:
            try:
                with backend.open(queue_name) as mine:
                    start.wait()
                    for i in range(rounds):
                        mine.put_setting(f"kit-own-{n}", str(i))
                        mine.put_setting("kit-all", f"{n}:{i}")
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert [store.get_setting(f"kit-own-{n}") for n in range(writers)] == [str(rounds - 1)] * writers
        last = store.get_setting("kit-all")
        assert last is not None and last.split(":")[1] == str(rounds - 1), \
            f"the shared setting holds {last!r}, not some writer's last value"
