"""JSON that every reader accepts (jq, JavaScript, pandas): a value that is not a finite number is null.

Python's json writes NaN and Infinity, which strict parsers refuse; NaN here always means "not computed"
(a precision with no single hit to rest on, a distance the bank never measured)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None (and bytes
    by their text)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):  # msgpack binary from a foreign publisher: as text, not a TypeError
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
