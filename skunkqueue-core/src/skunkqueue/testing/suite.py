"""Placeholder: the conformance suite lands here."""

from __future__ import annotations


class ConformanceSuite:
    """The behavioural tests every backend runs (being written)."""
