"""Jobs for demo_screens.py: a little mail and billing traffic, some of it failing."""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta

from skunkqueue import SkunkQueue

queue = SkunkQueue("shop", conn_url=os.environ.get("SKUNQ_URL"))


@queue.event(routes=["email"], retries=1, retry_backoff=0.2)
def send_receipt(order: int, address: str) -> str:
    time.sleep(random.uniform(0.01, 0.3))
    if order % 17 == 0:
        raise ConnectionError(f"SMTP server refused {address}")
    return f"sent to {address}"


@queue.event(routes=["billing"])
def charge(order: int, cents: int) -> dict[str, int]:
    time.sleep(random.uniform(0.05, 0.6))
    if cents > 90_000:
        raise ValueError(f"amount {cents} over the card limit")
    return {"order": order, "charged": cents}


@queue.periodic(routes=["billing"], cron="0 3 * * *", tz="Europe/Berlin")
def nightly_invoices() -> int:
    return 0


@queue.periodic(routes=["email"], every=timedelta(minutes=10))
def retry_bounces() -> int:
    return 0
