"""JSON encoding on the mint path: orjson where it writes exactly what `json.dumps` would, the stdlib elsewhere.

orjson encodes a minted token's claims, the answer and an audit line at a tenth of the stdlib's cost. Each
function here promises the stdlib's exact output, so that nothing a client, a log reader or a test sees changes;
the stdlib takes over wherever orjson would write something else or refuses the value.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["dumps_ascii", "dumps_utf8"]

# Python writes a float's negative one-digit exponent with two digits (1.5e-07), orjson with one (1.5e-7): such
# output (or a string that merely looks like it) is left to the stdlib.
_SHORT_EXPONENT = re.compile(rb"\de-\d(?!\d)")


def _short_exponent(data: bytes) -> bool:
    # The regex walks every byte (14 us over an audit line's 2 KB); `in` finds "e-" at memchr speed, and most
    # lines hold none.
    return b"e-" in data and _SHORT_EXPONENT.search(data) is not None
# orjson leaves these to `default` as json.dumps would (it would otherwise write them its own way).
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps_utf8(value: Any, *, floats: bool = True) -> bytes:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")`, for values without a
    float JSON cannot hold (the minted claims and the answer have none; orjson would write null for it).

    `floats=False` is the caller's word that the value holds no float at all (the minted claims and the answer
    are strings, integers, booleans and None by construction): then no exponent can differ, and the output is not
    searched for one (a search costs as much as the encoding).
    """
    try:
        data = orjson.dumps(value, option=_PASSTHROUGH)
    except (orjson.JSONEncodeError, TypeError):
        # Lone surrogates, integers past 64 bits, types orjson has no rule for: the stdlib decides (and fails
        # the same way it always did).
        pass
    else:
        if not floats or not _short_exponent(data):
            return data
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dumps_ascii(value: Any, default: Any = None) -> str:
    """`json.dumps(value, separators=(",", ":"), default=default)`: ASCII only, other characters escaped.

    One difference, for log lines only: a float JSON cannot hold (inf, NaN, as a claim of 1e400 decodes) is
    written null, where the stdlib writes the non-JSON Infinity or NaN.
    """
    try:
        data = orjson.dumps(value, default=default, option=_PASSTHROUGH)
    except (orjson.JSONEncodeError, TypeError):
        pass
    else:
        if data.isascii() and not _short_exponent(data):
            return data.decode("ascii")
    return json.dumps(value, separators=(",", ":"), default=default)
