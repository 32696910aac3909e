"""Who may act: read-only without a token; with one, a signed-in session plus CSRF checks.

Every state-changing request is a POST that must pass all of:

* it comes from this site: ``Origin`` (or ``Sec-Fetch-Site``) when the browser
  sends one names this very origin, so another site's form or script is refused;
* it carries a valid session cookie (``HttpOnly``, ``SameSite=Strict``), set
  by signing in with the token, or an ``Authorization: Bearer TOKEN`` header
  (scripts; browsers never add that header to a cross-site request);
* a browser form also carries the session's CSRF value, which another site
  cannot read.

Sessions are signed with a key derived from the token and a per-process salt,
so restarting ``skunq web`` or changing the token signs everybody out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request

COOKIE = "skunq_session"


class Guard:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self._key = hashlib.sha256(secrets.token_bytes(32) + (token or "").encode()).digest()

    @property
    def read_only(self) -> bool:
        return not self.token

    def _sign(self, what: str) -> str:
        return hmac.new(self._key, what.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign('session:' + nonce)}"

    def session_nonce(self, request: Request) -> str | None:
        """The nonce of a valid session cookie, or None."""
        if self.read_only:
            return None
        cookie = request.cookies.get(COOKIE, "")
        nonce, _, sig = cookie.partition(".")
        if nonce and hmac.compare_digest(sig, self._sign("session:" + nonce)):
            return nonce
        return None

    def csrf_for(self, request: Request) -> str:
        nonce = self.session_nonce(request)
        return self._sign("csrf:" + nonce) if nonce else ""

    def token_matches(self, offered: str) -> bool:
        return bool(self.token) and hmac.compare_digest(offered.encode(), (self.token or "").encode())

    def bearer(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    @staticmethod
    def same_origin(request: Request) -> bool:
        """False when the browser tells us the request was made by another site."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is not None:
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            return origin == own
        return True

    def refusal(self, request: Request, form_csrf: str | None) -> str | None:
        """Why this action is refused, or None when it may go ahead."""
        if self.read_only:
            return "This monitor is read-only: start skunq web with --token (or SKUNQ_WEB_TOKEN) to allow actions."
        if not self.same_origin(request):
            return "Refused: the request came from another site."
        if self.bearer(request):
            return None
        expected = self.csrf_for(request)
        if not expected:
            return "Sign in with the token first."
        if not form_csrf or not hmac.compare_digest(form_csrf, expected):
            return "Refused: the form's CSRF value is missing or stale; reload the page and try again."
        return None
