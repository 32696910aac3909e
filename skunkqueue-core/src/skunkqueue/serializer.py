"""Encoding job arguments and results.

JSON is the default: whatever a worker reads from the store is plain data.
``pickle`` is available only when a queue opts in, because unpickling runs
code: whoever can write to the store could then run code in every worker.
"""

from __future__ import annotations

import json
import pickle
import sys
from typing import Any

from skunkqueue.errors import ConfigurationError, SerializationError

SERIALIZERS = ("json", "pickle")

# What json.dumps(value, separators=(",", ":"), allow_nan=False) builds on every call, built once.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def check_name(name: str) -> str:
    if name not in SERIALIZERS:
        raise ConfigurationError(
            f"Unknown serializer {name!r}; use 'json' (default) or 'pickle' (trusted stores only)."
        )
    return name


def dumps(value: Any, serializer: str, *, what: str = "value") -> bytes:
    try:
        if serializer == "pickle":
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return _JSON.encode(value).encode()
    except RecursionError:
        raise SerializationError(
            f"Cannot serialize the {what} with {serializer}: nested too deeply "
            f"(more than about {sys.getrecursionlimit()} levels)."
        ) from None
    except (TypeError, ValueError, pickle.PicklingError, AttributeError) as exc:
        hint = (" Pass JSON types (str, int, float, bool, None, list, dict), "
                "or create the queue with serializer='pickle'." if serializer == "json" else "")
        raise SerializationError(f"Cannot serialize the {what} with {serializer}: {exc}.{hint}") from None


def loads(data: bytes, serializer: str, *, what: str = "value") -> Any:
    try:
        if serializer == "pickle":
            return pickle.loads(data)
        if serializer == "json":
            return json.loads(data)
    except RecursionError:
        raise SerializationError(f"Cannot decode the {what} ({serializer}): nested too deeply.") from None
    except Exception as exc:
        raise SerializationError(f"Cannot decode the {what} ({serializer}): {exc}") from None
    raise SerializationError(f"Unknown serializer {serializer!r} in the stored job.")


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str) -> bytes:
    return dumps([list(args), kwargs], serializer, what="job arguments")


def loads_arguments(data: bytes, serializer: str) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` from the encoded arguments: a stored payload's are
    ``headers.arguments(payload)``, without the signature and headers in front (the framing is
    :mod:`skunkqueue.headers`'s business, the encoding this module's)."""
    value = loads(data, serializer, what="job arguments")
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not isinstance(value[0], (list, tuple)) or not isinstance(value[1], dict)):
        raise SerializationError("The stored job arguments are not [args, kwargs].")
    return list(value[0]), dict(value[1])
