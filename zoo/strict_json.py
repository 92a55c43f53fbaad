"""JSON as every other tool reads it: Python's `json.dumps` writes NaN and inf as the bare
tokens `NaN` and `Infinity`, which strict parsers (JavaScript, jq, most languages' JSON
libraries, and so most tools that would read a run's records) reject. Everything stepzoo
writes as JSON goes through `dumps`, which writes a non-finite number as null; readers
take null for NaN (`benchmarks.records.load_records`). Python's own `json.loads` reads
both forms, so files written before keep loading."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float in it (in dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """`json.dumps` of `value` with non-finite numbers as null; strict JSON, always."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
