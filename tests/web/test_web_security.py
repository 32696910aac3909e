"""Read-only mode, the token, cross-site refusal, escaping and redaction, against a real `skunq web`."""

from __future__ import annotations

import http.client
import http.server
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlencode

import pytest
from conftest import SKUNQ, Store, Web, redis_servers, shot
from playwright.sync_api import expect

TOKEN = "s3cret-token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def call(web: Web, method: str, path: str, form: dict[str, str] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    body = urlencode(form).encode() if form is not None else None
    conn.request(method, path, body=body, headers={**(FORM if form is not None else {}), **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text


def sign_in(web: Web) -> tuple[str, str]:
    """A session cookie and its CSRF value, as a browser would hold them."""
    status, headers, _ = call(web, "POST", "/login", {"token": TOKEN})
    assert status == 303, status
    cookie = headers["set-cookie"].split(";")[0]
    assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
    _, _, page = call(web, "GET", "/purge?route=fast", headers={"Cookie": cookie})
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page
    return cookie, found.group(1)


def state_of(store: Store, job_id: str) -> str:
    record = store.queue_handle().get(job_id)
    assert record is not None
    return str(record.state)


def test_read_only_without_a_token(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    web = start_web(sqlite_store)
    job_id = sqlite_store.job("add").fire(1, 2).ids[0]
    _, _, page = call(web, "GET", "/")
    assert "read-only" in page and "purge" not in page.lower().replace("purge…", "")
    _, _, detail = call(web, "GET", f"/jobs/{job_id}")
    assert "/kill" not in detail
    for path in (f"/jobs/{job_id}/kill", "/purge", "/dead", f"/jobs/{job_id}/retry"):
        status, _, text = call(web, "POST", path, {"route": "fast", "confirm": "fast", "action": "retry"},
                               headers={"Authorization": "Bearer anything"})
        assert status == 403 and "read-only" in text, (path, status)
    status, _, _ = call(web, "POST", "/login", {"token": ""})
    assert status == 403
    assert state_of(sqlite_store, job_id) == "pending"
    assert sqlite_store.queue_handle().counts() == {("fast", "pending"): 1}


def test_token_session_and_csrf(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    web = start_web(sqlite_store, token=TOKEN)
    job_id = sqlite_store.job("add").fire(1, 2).ids[0]
    kill = f"/jobs/{job_id}/kill"
    assert call(web, "POST", kill, {})[0] == 403                                          # nobody
    assert call(web, "POST", "/login", {"token": TOKEN + "x"})[0] == 403                  # wrong token
    assert call(web, "POST", kill, {}, headers={"Authorization": f"Bearer {TOKEN}x"})[0] == 403
    assert call(web, "POST", kill, {}, headers={"Cookie": "skunq_session=abc.def"})[0] == 403  # forged cookie
    cookie, csrf = sign_in(web)
    status, _, text = call(web, "POST", kill, {}, headers={"Cookie": cookie})               # no CSRF value
    assert status == 403 and "CSRF" in text
    assert call(web, "POST", kill, {"csrf": "0" * 64}, headers={"Cookie": cookie})[0] == 403
    # Another site's request, even carrying a stolen CSRF value, is refused by its Origin.
    status, _, text = call(web, "POST", kill, {"csrf": csrf},
                           headers={"Cookie": cookie, "Origin": "http://evil.example"})
    assert status == 403 and "another site" in text
    assert call(web, "POST", kill, {"csrf": csrf}, headers={"Cookie": cookie, "Sec-Fetch-Site": "cross-site"})[0] == 403
    assert state_of(sqlite_store, job_id) == "pending"
    status, headers, _ = call(web, "POST", kill, {"csrf": csrf},
                              headers={"Cookie": cookie, "Origin": web.base})
    assert status == 303 and headers["location"].startswith(f"/jobs/{job_id}?msg=")
    assert state_of(sqlite_store, job_id) == "killed"
    # Scripts may use the token as a bearer header instead of a session.
    other = sqlite_store.job("add").fire(3, 4).ids[0]
    assert call(web, "POST", f"/jobs/{other}/kill", {}, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 303
    assert state_of(sqlite_store, other) == "killed"
    # A redirect target from the query string never leaves the site.
    third = sqlite_store.job("add").fire(5, 6).ids[0]
    status, headers, _ = call(web, "POST", f"/jobs/{third}/kill?next=//evil.example/x", {},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 303 and headers["location"].startswith(f"/jobs/{third}?")


def test_purge_needs_the_route_typed(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    web = start_web(sqlite_store, token=TOKEN)
    add = sqlite_store.job("add")
    for i in range(3):
        add.fire(i, i)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, headers, _ = call(web, "POST", "/purge", {"route": "fast", "confirm": "fas"}, headers=bearer)
    assert status == 303 and "not+confirmed" in headers["location"]
    assert sqlite_store.queue_handle().counts() == {("fast", "pending"): 3}
    status, headers, _ = call(web, "POST", "/purge", {"route": "fast", "confirm": "fast"}, headers=bearer)
    assert status == 303 and "Purged+3" in headers["location"]
    assert sqlite_store.queue_handle().counts() == {}


def test_other_host_names_are_refused(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own host name: refuse that name.
    web = start_web(sqlite_store, token=TOKEN)
    assert call(web, "GET", "/", headers={"Host": "evil.example"})[0] == 400
    assert call(web, "GET", "/", headers={"Host": f"localhost:{web.port}"})[0] == 200


@pytest.fixture
def evil_site() -> Iterator[Callable[[str], str]]:
    """Serves one page from another origin (localhost, another port) and returns its address."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def publish(html: str) -> str:
        pages["/attack"] = html
        return f"http://localhost:{server.server_address[1]}/attack"

    yield publish
    server.shutdown()
    server.server_close()


def test_a_signed_in_browser_refuses_another_sites_form(sqlite_store: Store, start_web: Callable[..., Web],
                                                        page: Any, evil_site: Callable[[str], str],
                                                        tmp_path: Path) -> None:
    web = start_web(sqlite_store, token=TOKEN)
    job_id = sqlite_store.job("add").fire(1, 1).ids[0]
    page.goto(web.base + "/login")
    page.fill("#token", TOKEN)
    page.click("#sign-in")
    page.wait_for_url(web.base + "/?msg=Signed+in")
    page.goto(web.base + f"/jobs/{job_id}")
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    assert csrf  # the signed-in page offers the kill button
    # The attacker even knows the CSRF value: the browser's cookie policy and our Origin check still refuse.
    attack = evil_site(f"""<form id=f method=post action="{web.base}/jobs/{job_id}/kill">
        <input name=csrf value="{csrf}"></form><script>document.getElementById('f').submit()</script>""")
    page.goto(attack)
    page.wait_for_url(f"{web.base}/jobs/{job_id}/kill")
    assert "Refused" in page.locator("body").inner_text() or "Sign in" in page.locator("body").inner_text()
    shot(page, tmp_path, "cross-site-refused")
    assert state_of(sqlite_store, job_id) == "pending"
    # The same button, pressed on the monitor's own page, works.
    page.goto(web.base + f"/jobs/{job_id}")
    page.click("form[action$='/kill'] button")
    expect(page.locator("#job-state")).to_have_text("killed")
    assert page.dialogs == [("confirm", "Kill this job? It will never run again.")]
    assert state_of(sqlite_store, job_id) == "killed"


def test_hostile_names_and_values_render_as_text(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    import webjobs

    from skunkqueue.job import Job
    hostile = "<script>alert(1)</script>"
    job = Job(sqlite_store.queue_handle(), webjobs.boom.func, ['<img src=x onerror="alert(2)">'])
    job_id = job.fire(hostile).ids[0]
    web = start_web(sqlite_store)  # after firing: the overview's first count already sees the job
    for path in ("/", "/jobs", f"/jobs/{job_id}", "/jobs?" + urlencode({"func": hostile, "route": hostile})):
        _, _, html = call(web, "GET", path)
        assert "<script>alert" not in html and "<img src=x" not in html, path
    _, _, detail = call(web, "GET", f"/jobs/{job_id}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail
    _, _, overview = call(web, "GET", "/")
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in overview
    _, headers, _ = call(web, "GET", "/")
    assert "script-src 'self'" in headers["content-security-policy"]


def test_store_passwords_never_show(tmp_path: Path, start_web: Callable[..., Web]) -> None:
    server = redis_servers.RedisServer(tmp_path / "redis-auth", password="hunter2-pw").start()
    try:
        store = Store("redis", server.url, "authq", tmp_path / "runs.txt")
        store.job("add").fire(1, 1)
        web = start_web(store)
        for path in ("/", "/jobs", "/workers", "/metrics"):
            _, _, text = call(web, "GET", path)
            assert "hunter2-pw" not in text, path
        _, _, page = call(web, "GET", "/")
        assert "redis://:***@127.0.0.1" in page
        assert "hunter2-pw" not in web.log.read_text()
    finally:
        server.stop()
    wrong = subprocess.run([*SKUNQ, "web", "-q", "q", "--backend", "redis", "--url",
                            "redis://user:pa55word@127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1
    assert "pa55word" not in wrong.stderr + wrong.stdout and "Traceback" not in wrong.stderr
    # The backend's reconnect warnings may come first; the failure itself is one line.
    assert wrong.stderr.strip().splitlines()[-1].startswith("Error: Cannot reach Redis at redis://user:***@"), \
        wrong.stderr
