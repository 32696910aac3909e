"""The seed's demo, in Python 3: fire a job and print its result.

Start a worker in this directory first:  skunq work -q demo -r foo
"""

from datetime import timedelta

from skunkqueue import SkunkQueue

# No backend arguments: the embedded SQLite backend, no server needed.
# For another store: SkunkQueue('demo', **default_cfg) with
# `from skunkqueue.persistence.redis import default_cfg` (or .mongodb, .fdb).
queue = SkunkQueue("demo")


@queue.event(routes=["foo"])
def add(first, second):
    # The return value is saved by the backend.
    return first + second


# Workers import this module to find `add`; the guard keeps them from firing jobs.
if __name__ == "__main__":
    handle = add.fire(4, 5)
    later = add.fire_at(timedelta(seconds=60), 4, 5)
    print("result", handle.wait(timeout=30))
    print("state", handle.state)
    print("scheduled", later.id, "is", later.state, "(due in 60 s)")
