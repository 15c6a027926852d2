"""JSON that strict parsers accept, for every file the project writes for people and tools.

Python's json writes NaN and Infinity bare, which is not JSON: jq, JavaScript's
JSON.parse and most other languages' parsers reject the whole file, and metrics.json
holds NaN wherever a round computed no value (round 0's losses, a loss term its stage
does not have). Here a non-finite float (NaN, +inf, -inf) becomes null, and
allow_nan=False makes the writer raise, should a non-finite ever reach json another
way, rather than write a file nobody else can read. Readers in the project take null
as "no value", as they took NaN (report.read_metrics).

Standard library only, so every layer above config may import it.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(obj: Any) -> Any:
    """obj with every non-finite float (in dicts, lists and tuples, at any depth) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def dump(obj: Any, fh, **kwargs) -> None:
    json.dump(finite_or_null(obj), fh, allow_nan=False, **kwargs)
