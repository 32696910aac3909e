"""Connection-address helpers shared by the backends."""

from __future__ import annotations

import re
from urllib.parse import unquote

# The password runs to the last "@" before the path: an unescaped "@" inside it must not leave a piece behind.
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*)(?P<password>:[^/]*)?@", re.I)


def redact(url: str | None) -> str:
    """The address with any password replaced by ``***``, safe for logs and errors."""
    if not url:
        return "(default address)"
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m['password'] else ''}@", url)


def scrub(text: str, url: str | None) -> str:
    """``text`` (a driver's error message, say) with ``url``'s password replaced by ``***``.

    Drivers quote the address they were given, sometimes percent-decoded, so
    both spellings go. The password runs to the last ``@``: an unescaped ``@``
    or ``:`` inside it must not leave a piece behind.
    """
    if not url or "@" not in url:
        return text
    userinfo = url.split("://", 1)[-1].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in sorted({password, unquote(password)} - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
