"""Workflows: a chain, a chord (a group and its callback) and a plain dependency.

Run a pool in this folder, then the script (both use the embedded SQLite file):

    skunq work -q pictures -r images --import workflows --concurrency 2 &
    python workflows.py
"""

from __future__ import annotations

from skunkqueue import SkunkQueue, chain, current_job, group

queue = SkunkQueue("pictures")


@queue.event(routes=["images"])
def fetch(url: str) -> str:
    return f"<bytes of {url}>"


@queue.event(routes=["images"])
def measure(body: str) -> int:
    return len(body)


@queue.event(routes=["images"], retries=2)
def resize(name: str, size: int) -> str:
    return f"{name}@{size}"


@queue.event(routes=["images"])
def zip_all(names: list[str], dest: str) -> str:
    return f"{dest}: {', '.join(names)}"


@queue.event(routes=["images"])
def report() -> dict[str, str]:
    ctx = current_job()
    return dict(ctx.dependencies or {}) if ctx else {}  # {parent id: how it ended}


if __name__ == "__main__":
    # Each step gets the previous step's result as its first argument.
    size = chain(fetch.s("https://example.org/a.png"), measure.s()).fire()
    print("chain:", size.wait(timeout=30))

    # zip_all(results, dest) runs once, after every member finished.
    archive = group(resize.s(name, 256) for name in ["a", "b", "c"]).then(zip_all.s("thumbs.zip")).fire()
    print("chord:", archive.wait(timeout=30))

    # A plain dependency: runs after both workflows, even if one of them failed.
    done = report.fire(after=[size, archive], on_failure="run")
    print("after:", sorted(done.wait(timeout=30).values()))
