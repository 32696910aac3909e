"""Screenshots of `skunq web` for the README, from a real pool doing real (demo) work.

    python skunkqueue-web/scripts/demo_screens.py OUT_DIR [SECONDS]

Starts a pool and `skunq web` on a fresh SQLite file, fires orders for
SECONDS (default 150) so the throughput chart has a few minutes in it, then
saves a screenshot of each view with Debian's /usr/bin/chromium.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    out = Path(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="skunq-demo-"))
    env = {**os.environ, "SKUNQ_URL": str(tmp / "shop.db"), "SKUNQ_QUEUE": "shop", "SKUNQ_WEB_TOKEN": "demo"}
    env["PYTHONPATH"] = str(HERE)
    skunq = [sys.executable, "-m", "skunkqueue.cli"]
    pool = subprocess.Popen([*skunq, "work", "-r", "email", "email", "billing", "--path", str(HERE)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    web = subprocess.Popen([*skunq, "web", "--port", "18099", "--import", "demo_jobs", "--path", str(HERE)],
                           env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        os.environ.update(SKUNQ_URL=env["SKUNQ_URL"])
        sys.path.insert(0, str(HERE))
        import demo_jobs

        end = time.monotonic() + seconds
        order = 1000
        while time.monotonic() < end:
            order += 1
            demo_jobs.send_receipt.fire(order, f"customer{order}@example.com")
            demo_jobs.charge.fire(order, random.choice([1999, 4500, 12900, 99900]) if order % 9 else 95000)
            time.sleep(random.uniform(0.05, 0.5))
        for order in range(5000, 5040):  # a backlog, so pending counts and the longest wait show
            demo_jobs.charge.fire(order, 2500)
        time.sleep(1)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            base = "http://127.0.0.1:18099"
            page.goto(base + "/login")
            page.fill("#token", "demo")
            page.click("#sign-in")
            page.goto(base + "/periodic")
            page.locator('tr[data-schedule="demo_jobs:retry_bounces"] button[data-act="pause"]').click()
            for name, path in (("overview", "/"), ("jobs", "/jobs?state=error"), ("dead", "/dead"),
                               ("workers", "/workers"), ("periodic", "/periodic")):
                page.goto(base + path)
                page.screenshot(path=str(out / f"{name}.png"), full_page=name != "jobs")
            page.goto(base + "/dead")
            page.locator("#jobs tbody a").first.click()
            page.screenshot(path=str(out / "job.png"), full_page=True)
            browser.close()
        with urllib.request.urlopen(base + "/metrics") as resp:
            (out / "metrics.txt").write_bytes(resp.read())
    finally:
        for proc in (web, pool):
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
