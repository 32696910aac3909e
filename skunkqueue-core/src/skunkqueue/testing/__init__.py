"""The conformance kit: one behavioural suite that every backend must pass.

A backend's tests subclass :class:`ConformanceSuite` and provide one fixture,
``backend``, returning a :class:`BackendUnderTest`::

    import pytest
    from skunkqueue.testing import BackendUnderTest, ConformanceSuite

    class TestMyStore(ConformanceSuite):
        @pytest.fixture
        def backend(self, my_server):
            return BackendUnderTest(name="mystore", url=my_server.url)

The kit is in parts, each usable alone with the same fixture:
:class:`ProtocolSuite` (the Persistence protocol in-process, any OS),
:class:`LifecycleSuite` (real worker processes and signals, Linux), and the
mixins in ``suite_supervision``, ``suite_fields``, ``suite_keys``,
``suite_periodic``, ``suite_async``, ``suite_names``, ``suite_summary`` and
``suite_trust``, ``suite_transactional``, ``suite_history`` and ``suite_settings``.
Optional roles (see :mod:`skunkqueue.persistence.roles`) are skipped, saying
why, unless the backend class implements them (``enqueue_keyed``, the
settings, the stats) or declares them (``supports_workflows``,
``supports_using``, the flow-control flags, ``pages_newest_first``);
``notifies`` and ``max_payload`` set what the kit expects. ``suite.PROVES``
says which roles each part holds a backend to.

Every test uses a fresh queue name, so one server can serve the whole run.
The kit starts real ``skunq work`` processes against the backend, so the
backend must be installed (its entry point registered) in the environment
that runs the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skunkqueue.testing.kit import BackendUnderTest

if TYPE_CHECKING:
    from skunkqueue.testing.suite import ConformanceSuite, LifecycleSuite, ProtocolSuite

__all__ = ["BackendUnderTest", "ConformanceSuite", "LifecycleSuite", "ProtocolSuite"]

_SUITES = ("ConformanceSuite", "LifecycleSuite", "ProtocolSuite")


def __getattr__(name: str) -> Any:
    # The suites import pytest. Job modules the kit's workers load import skunkqueue.testing.kit,
    # and so this package: loading the suites only when asked for keeps pytest (~0.3 s, ~10 MB)
    # out of every worker process.
    if name in _SUITES:
        from skunkqueue.testing import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
