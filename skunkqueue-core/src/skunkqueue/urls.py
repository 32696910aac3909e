"""Connection-address helpers shared by the backends."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*)(?::[^@/]*)?@", re.I)


def redact(url: str | None) -> str:
    """The address with any password replaced by ``***``, safe for logs and errors."""
    if not url:
        return "(default address)"
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
