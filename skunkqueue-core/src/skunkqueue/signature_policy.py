"""What a queue's workers require of signatures, kept in the store so that producers learn it at ``fire``.

A pool publishes, at start, whether its workers run only signed records and
the ids of the keys they accept (:func:`skunkqueue.signing.key_id`: public
names that reveal nothing of the keys). A producer reads that notice (at most
every :data:`CHECK_EVERY` seconds per queue object) and refuses to fire what
the workers would refuse: an unsigned record when they require signatures, or
a record signed with a key they do not accept. The pool that started last
speaks for the queue; backends without settings publish nothing, and their
producers learn nothing before the worker refuses.
"""

from __future__ import annotations

import json

from skunkqueue import signing
from skunkqueue.persistence import Persistence

SETTING = "signing"
CHECK_EVERY = 30.0


def notice() -> str:
    """This process's policy (from its environment), as stored."""
    keys = signing.verify_keys_from_env()
    return json.dumps({"required": bool(keys) and not signing.accepts_unsigned(),
                       "keys": [signing.key_id(k) for k in keys]})


def publish(store: Persistence) -> None:
    """Store this pool's policy for the queue's producers (a pool calls it at start)."""
    if store.supports_settings:
        store.put_setting(SETTING, notice())


def problem(stored: str | None, key: bytes | None, queue: str) -> str | None:
    """Why the workers would refuse what a producer with ``key`` signs, or None."""
    try:
        policy = json.loads(stored) if stored else {}
        required, accepted = bool(policy.get("required")), list(policy.get("keys") or [])
    except (ValueError, AttributeError, TypeError):
        return None  # not ours to judge: the workers decide
    if key is None and required:
        return (f"The workers of queue {queue} run only signed jobs and this process has no "
                f"{signing.SECRET_ENV}: they would refuse this job. Set {signing.SECRET_ENV} to their key.")
    if key is not None and accepted and signing.key_id(key) not in accepted:
        return (f"The workers of queue {queue} do not accept this process's {signing.SECRET_ENV} (key id "
                f"{signing.key_id(key)}; they accept {', '.join(accepted)}): they would refuse this job. "
                f"Set the key they use, or add it to their {signing.PREVIOUS_ENV} while rotating.")
    return None
