"""Every SKUNQ_* variable the code reads is in the documentation's table of variables."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Read only by the conformance kit's own worker processes and the clock-skew test helper.
INTERNAL = {"SKUNQ_KIT_QUEUE", "SKUNQ_KIT_ROUTES", "SKUNQ_KIT_TICKS", "SKUNQ_TEST_CLOCK_SKEW"}


def test_the_configuration_page_lists_every_variable_the_code_reads() -> None:
    read = set()
    for source in ROOT.glob("skunkqueue-*/src/**/*.py"):
        read |= set(re.findall(r"SKUNQ_[A-Z][A-Z_]*[A-Z]", source.read_text()))
    page = (ROOT / "docs" / "concepts" / "configuration.md").read_text()
    table = page[page.index("## Every variable"):]
    documented = set(re.findall(r"SKUNQ_[A-Z][A-Z_]*[A-Z]", table))
    assert len(read) > 10
    assert read - INTERNAL - documented == set()
    assert documented <= read, documented - read  # and the table names nothing the code does not read
