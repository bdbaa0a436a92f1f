"""JSON encoding on the mint path: orjson where it writes exactly what `json.dumps` would, the stdlib elsewhere.

orjson encodes a minted token's claims, the answer and an audit line at a tenth of the stdlib's cost.
`dumps_utf8` (what clients get) promises the stdlib's exact bytes: the stdlib takes over wherever orjson would
write something else or refuses the value. `dumps_ascii` (log lines) promises the stdlib's text but for the
spelling of some floats, which read back as the same numbers.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["dumps_ascii", "dumps_utf8"]

# orjson writes a float as the shortest text that reads back as the same float, as Python's repr does, but spells
# small ones its own way: 1e-7 where Python writes 1e-07 (exponents -6 to -9), 0.00001 where it writes 1e-05.
# Output holding either spelling (or a string that merely looks like one) is left to the stdlib.
_ORJSON_SPELLING = re.compile(rb"\de-\d(?!\d)|0\.0000")


def _orjson_spelling(data: bytes) -> bool:
    # The regex walks every byte; `in` is cheaper, and most output holds neither.
    return (b"e-" in data or b"0.0000" in data) and _ORJSON_SPELLING.search(data) is not None


# orjson leaves these to `default` as json.dumps would (it would otherwise write them its own way).
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps_utf8(value: Any, *, floats: bool = True) -> bytes:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")`, for values without a
    float JSON cannot hold (the minted claims and the answer have none; orjson would write null for it).

    `floats=False` is the caller's word that the value holds no float at all (the minted claims and the answer
    are strings, integers, booleans and None by construction): then no spelling can differ, and the output is not
    searched for one (a search costs as much as the encoding).
    """
    try:
        data = orjson.dumps(value, option=_PASSTHROUGH)
    except (orjson.JSONEncodeError, TypeError):
        # Lone surrogates, integers past 64 bits, types orjson has no rule for: the stdlib decides (and fails
        # the same way it always did).
        pass
    else:
        if not floats or not _orjson_spelling(data):
            return data
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dumps_ascii(value: Any, default: Any = None) -> str:
    """`json.dumps(value, separators=(",", ":"), default=default)`, for log lines: ASCII only, other characters
    escaped as the stdlib escapes them.

    Floats are the one difference: written as orjson writes them, which reads back as the very same float but
    spells a small one its own way (1e-7 for 1e-07, 0.00001 for 1e-05), and a float JSON cannot hold (inf, NaN, as
    a claim of 1e400 decodes) as null where the stdlib writes the non-JSON Infinity or NaN. A log reader gets the
    same values; searching every line for those spellings would cost a third of its encoding.
    """
    try:
        # Non-ASCII output fails to decode, and the stdlib escapes it.
        return orjson.dumps(value, default=default, option=_PASSTHROUGH).decode("ascii")
    except (orjson.JSONEncodeError, TypeError, UnicodeDecodeError):
        return json.dumps(value, separators=(",", ":"), default=default)
