"""Effectively-once side effects with the fencing token (run it: python examples/fencing.py).

A job may be run twice: its worker can stall past its lease (a long GC pause,
a stopped VM) while another worker takes the job over. Both attempts then
write. Each attempt carries a fencing token, higher than every earlier
attempt's (``skunkqueue.current_job().token``), so the target of the write
can refuse the older attempt: remember the highest token that wrote, and only
let a higher one write.

This file demonstrates the guard on an SQLite table; the same
``WHERE token < :token`` works in any database with conditional updates.
"""

from __future__ import annotations

import sqlite3
import sys

import skunkqueue

SCHEMA = "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, status TEXT, token INTEGER NOT NULL)"


def guarded_write(db: sqlite3.Connection, invoice: str, status: str, token: int) -> bool:
    """Write ``status`` unless an attempt with a higher (or equal) token already wrote. True if written."""
    db.execute(SCHEMA)
    db.execute("INSERT OR IGNORE INTO invoices (id, status, token) VALUES (?, 'new', 0)", (invoice,))
    written = db.execute("UPDATE invoices SET status = ?, token = ? WHERE id = ? AND token < ?",
                         (status, token, invoice, token)).rowcount == 1
    db.commit()
    return written


queue = skunkqueue.SkunkQueue("fencing-demo")


@queue.event(routes=["invoices"])
def send_invoice(db_path: str, invoice: str) -> bool:
    ctx = skunkqueue.current_job()
    assert ctx is not None, "only meaningful inside a job"
    # ... send the invoice ...
    with sqlite3.connect(db_path) as db:
        return guarded_write(db, invoice, f"sent by attempt {ctx.attempt}", ctx.token)


if __name__ == "__main__":
    # Without a worker: replay what two overlapping attempts would do.
    path = sys.argv[1] if len(sys.argv) > 1 else ":memory:"
    db = sqlite3.connect(path)
    print("attempt 2 (token 2, took over):", guarded_write(db, "inv-1", "sent by attempt 2", 2))
    print("attempt 1 (token 1, stale):    ", guarded_write(db, "inv-1", "sent by attempt 1", 1))
    print("stored:", db.execute("SELECT status, token FROM invoices").fetchone())
