"""JSON on the mint path: orjson's encodings equal the stdlib's byte for byte, and strict decoding stays strict."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway._json import dumps_ascii, dumps_utf8
from gateway.jose import StrictJSONError, _strict_loads, strict_loads

VALUES: list[Any] = [
    {"success": True, "token": "a.b.c", "expires": 1_700_000_900, "projects": ["sampleproject"]},
    {"identity": {"repository": "group/projekt-ü", "protected_ref": None, "n": -3, "f": 1.5}},
    {"controls": '\x00\x1f\x7f\n\t"\\/', "separators": "\u2028\u2029", "emoji": "\U0001f600"},
    ["list", 0, 2**63 - 1, -(2**63), 0.1, 1e16, 1.5e-07, 2e-5, 3e-10, -4.5e-9, True, False, None, {}],
    {"looks-like-a-float": "1e-5", "iat": 1_700_000_000.5},
    {"big": 2**64 + 1},
    # orjson spells these its own way (0.00001, 1e-7): each alone, with nothing else in the output to send it to
    # the stdlib.
    {"f": 2e-5},
    {"f": -9.5e-5},
    {"f": 1e-7},
    [3.5e-9],
]
# Floats orjson and Python's repr both spell the same way: the rest of the range, edges included.
SAME_SPELLING = [
    0.0001, 1.5e-10, 1e-300, 5e-324, 0.5, 1e15, 1e16, 1.2345678901234568e17, 2.5e25, -0.0, 1795714183.0894794,
]  # fmt: skip


@pytest.mark.parametrize("value", VALUES)
def test_dumps_utf8_equals_the_stdlib(value: Any) -> None:
    """dumps_utf8 gives the bytes of json.dumps(compact, ensure_ascii=False) encoded as UTF-8."""
    assert dumps_utf8(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


NO_FLOATS: list[Any] = [
    VALUES[0],
    VALUES[2],
    {"looks-like-a-float": "1e-5 and 2E-7", "n": -(10**18), "sub": "gitlab-com:group/projekt-ü"},
    VALUES[5],
]


@pytest.mark.parametrize("value", NO_FLOATS)
def test_dumps_utf8_without_floats_equals_the_stdlib(value: Any) -> None:
    """Told that its value holds no float, dumps_utf8 skips its exponent search and still gives the stdlib's bytes,
    strings that look like exponents included."""
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert dumps_utf8(value, floats=False) == expected


def _small_floats(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_small_floats(v) for v in value.values())
    if isinstance(value, list):
        return any(_small_floats(v) for v in value)
    return isinstance(value, float) and 0 < abs(value) < 1e-4


@pytest.mark.parametrize("value", [*VALUES, SAME_SPELLING])
def test_dumps_ascii_equals_the_stdlib(value: Any) -> None:
    """dumps_ascii gives the text of json.dumps(compact), non-ASCII escaped as the stdlib escapes it; a small float
    (under 1e-4) reads back as the same float, spelt as orjson spells it."""
    expected = json.dumps(value, separators=(",", ":"))
    line = dumps_ascii(value)
    assert line.isascii()
    if _small_floats(value):
        assert json.loads(line) == json.loads(expected)
    else:
        assert line == expected


def test_dumps_ascii_reads_back_every_float_as_itself() -> None:
    """A log line never changes a number: every float of a wide sweep, small ones included, reads back equal."""
    floats = [m * 10.0**e for e in range(-330, 309) for m in (1.0, 1.5, 3.141592653589793, 9.999999999999998)]
    floats = [f for f in floats if f != float("inf")]
    assert json.loads(dumps_ascii(floats)) == floats
    assert json.loads(dumps_ascii([-f for f in floats])) == [-f for f in floats]


def test_dumps_ascii_writes_an_infinite_float_as_null() -> None:
    """A float JSON cannot hold (a claim of 1e400 decodes to inf) is null in a log line, never bare Infinity."""
    assert json.loads(dumps_ascii({"x": float("inf"), "y": float("nan")})) == {"x": None, "y": None}


def test_dumps_utf8_fails_on_a_lone_surrogate_as_the_stdlib_does() -> None:
    """A lone surrogate cannot be UTF-8: the error is the stdlib's own, as it always was."""
    with pytest.raises(UnicodeEncodeError):
        dumps_utf8({"a": "\ud800"})


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":1}',
        b'{"a":{"b":"x","b":"x"}}',
        b'[{"c":[1,{"d":1,"d":2}]}]',
        b'{"iss":"https://x","sub":"y","iss":"https://x"}',
    ],
)
def test_strict_loads_refuses_compact_duplicates(text: bytes) -> None:
    """A duplicate member is refused in compact JSON too, at any depth (the orjson fast path never takes it)."""
    with pytest.raises(StrictJSONError, match="duplicate"):
        strict_loads(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'{"a":1,"b":[true,null,"\xc3\xbc"]}', {"a": 1, "b": [True, None, "ü"]}),
        (b'{"a": 1, "b": "\\u00fc"}', {"a": 1, "b": "ü"}),
        (b'{"n":123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
        (b'{"s":"\\ud800"}', {"s": "\ud800"}),
        (b'{"f":1E5}', {"f": 100000.0}),
    ],
)
def test_strict_loads_reads_what_the_stdlib_reads(text: bytes, value: Any) -> None:
    """Compact or not, escaped or not, big integers and exponents: the value is the stdlib's."""
    assert strict_loads(text) == value == json.loads(text)


@pytest.mark.parametrize("text", [b'{"a":NaN}', b"[Infinity]", b'{"a":"\xff"}', b'{"a":1', b"\xef\xbb\xbf{}"])
def test_strict_loads_refuses_what_is_not_strict_json(text: bytes) -> None:
    """NaN, Infinity, invalid UTF-8, truncated text and a byte-order mark are refused."""
    with pytest.raises(StrictJSONError):
        strict_loads(text)


@pytest.mark.parametrize(
    "text",
    [b'{"s":"\\ud800"}', b'{"s":"\\udfff"}', b'{"\\ud800":1}', b'{"a":["x","\\udc00"]}', b'{"a":{"b":"\\ud83d"}}'],
)
def test_a_lone_surrogate_is_never_reported_surrogate_free(text: bytes) -> None:
    """`check_claims` skips its surrogate walk only for values `_strict_loads` calls surrogate-free; every lone
    surrogate escape, in a value or a name, at any depth, must take the path that says it may hold one."""
    value, surrogate_free = _strict_loads(text)
    assert value == json.loads(text)
    assert not surrogate_free



def _stdlib_strict(text: bytes) -> Any:
    """The reference: the stdlib decoder with duplicates and NaN refused, on strict UTF-8."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({name for name, _ in items}) != len(items):
            raise ValueError("duplicate")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _flat_objects() -> list[bytes]:
    """Flat objects as issuers and attackers write them: duplicates (next to each other or far apart, with
    values of other types), spacing, every JSON type, quotes and backslashes in strings, big integers."""
    rng = random.Random(1)  # noqa: S311 -- a fixed corpus of test inputs, not a secret
    values = ['"x"', '""', '"a b"', "1", "-0", "0.5", "1e5", "true", "false", "null", "18446744073709551616",
              '"\\"q\\""', '"\\\\"', '"\\u0022"', "[]", '["x"]', '{"n":"x"}']  # fmt: skip
    texts = []
    for _ in range(400):
        names = [rng.choice("abcd") for _ in range(rng.randint(1, 6))]
        space = rng.choice(["", " ", "\n  "])
        members = [f'"{name}":{space}{rng.choice(values)}' for name in names]
        texts.append(("{" + space + f",{space}".join(members) + space + "}").encode())
    return texts


@pytest.mark.parametrize("text", _flat_objects())
def test_strict_loads_is_the_strict_stdlib_reading(text: bytes) -> None:
    """Whatever path a text takes, strict_loads reads what the strict stdlib decoder reads and refuses what it
    refuses: a duplicate member is never taken, with or without spaces, whatever the values' types."""
    try:
        expected = _stdlib_strict(text)
    except ValueError:
        with pytest.raises(StrictJSONError):
            strict_loads(text)
    else:
        value = strict_loads(text)
        assert value == expected
        assert [type(v) for v in value.values()] == [type(v) for v in expected.values()]
