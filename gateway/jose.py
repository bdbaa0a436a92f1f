"""Strict compact-JWS handling on top of joserfc.

`peek` reads a token without trusting it: only its `iss` may be used, and only to choose a verifier.
`check_header` then applies the header rules, once the issuer is known to be trusted: a token that names no
trusted issuer is refused for that (`invalid-payload`, as Warehouse answers) whatever its header holds. `verify`
checks the signature (joserfc's key rules for the algorithm, once per key; RS* then straight on `cryptography`,
the rest by joserfc's algorithms) and then the claims: their types, and the values of the registered ones as
joserfc's claims registry checks them (written out here, for speed). Parsing is ours
because the standard `json` module quietly keeps the last of duplicate members, which would let a token mean one
thing to us and another to a different parser.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NewType

import orjson
import pybase64
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from joserfc.errors import JoseError
from joserfc.jwk import Key
from joserfc.jws import JWSRegistry

from .errors import InvalidPayload, InvalidToken

UnverifiedClaims = NewType("UnverifiedClaims", Mapping[str, Any])
VerifiedClaims = NewType("VerifiedClaims", Mapping[str, Any])

# Headers that would let the token choose its own key or change how it is processed. `jwk`, `jku`, `x5u`
# and `x5c` carry or point at a key (an attacker's); `crit` and `b64` change the signing input rules.
BANNED_HEADERS = frozenset({"crit", "b64", "jku", "x5u", "x5c", "jwk"})
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")

# The bytes a compact JWS is made of: the base64url alphabet and the dots between its segments.
_COMPACT_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
_KID = re.compile(r"[\x21-\x7e]{1,256}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A year: longer-lived tokens could not be remembered for replay protection, and no CI issuer makes them.
MAX_LIFETIME = 366 * 24 * 3600


class Unverified(NamedTuple):
    header: Mapping[str, Any]
    claims: UnverifiedClaims
    signing_input: bytes
    signature: bytes
    # True when the payload took the orjson path of `strict_loads`, which refuses lone surrogates; otherwise
    # (the stdlib path lets a `\ud800` escape through) `check_claims` must look for one.
    surrogate_free: bool = False

    @property
    def issuer(self) -> str:
        return self.claims["iss"]  # type: ignore[no-any-return]

    @property
    def kid(self) -> str:
        return self.header["kid"]  # type: ignore[no-any-return]

    @property
    def alg(self) -> str:
        return self.header["alg"]  # type: ignore[no-any-return]


def peek(token: str) -> Unverified:
    """Split and strictly decode a compact JWS and read its `iss`; the header rules are `check_header`'s."""
    # The compact form: ASCII, nothing but base64url and dots (no padding, no whitespace), and three segments of
    # which the signature alone may be empty. The base64 decoder refuses any byte outside the base64 alphabets, so
    # what is left to look for is the standard alphabet's `+` and `/` and padding: three memchr calls, where a
    # walk of every byte cost a mint 17,000 instructions.
    data = token.encode("ascii") if token.isascii() else b"!"
    parts = data.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[1] or b"+" in data or b"/" in data or b"=" in data:
        raise _not_compact()
    try:
        header, _ = _decode_object(parts[0], "header")
        claims, surrogate_free = _decode_object(parts[1], "payload")
        signature = _b64decode(parts[2], "signature")
    except InvalidPayload:
        # A byte outside the alphabet anywhere is a malformed token, whatever else is wrong with it: said as such,
        # as when this was checked first.
        if data.translate(None, _COMPACT_ALPHABET):
            raise _not_compact() from None
        raise
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise InvalidPayload("token has no 'iss' string, so its issuer cannot be identified")
    # Positionally (keyword binding costs more than the rest of this tail), in the fields' order.
    signing_input = data[: len(parts[0]) + 1 + len(parts[1])]
    return Unverified(header, UnverifiedClaims(claims), signing_input, signature, surrogate_free)


def _not_compact() -> InvalidPayload:
    return InvalidPayload("token is not a compact JWS (three base64url segments separated by '.')")


def _b64decode(segment: bytes, what: str) -> bytes:
    """A base64url segment (holding no `+`, `/` or `=`: peek checked) as base64.urlsafe_b64decode reads it (pybase64
    decodes exactly as binascii does, trailing bits and a one-too-long segment included; with `validate` it refuses
    any other byte outside the alphabet)."""
    try:
        # Positional: pybase64 parses keyword arguments by name on every call, a third of a decode's cost.
        return pybase64.b64decode(segment + _PADDING[len(segment) % 4], b"-_", True)  # altchars, validate
    except (binascii.Error, ValueError):
        raise InvalidPayload(f"token {what} is not valid base64url") from None


# What base64 needs after a segment of each length modulo 4 (1 is impossible, and "===" makes it fail).
_PADDING = (b"", b"===", b"==", b"=")


class StrictJSONError(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        names = [name for name, _ in pairs]
        dupes = sorted({name for name in names if names.count(name) > 1})
        raise StrictJSONError(f"duplicate member(s) {', '.join(map(repr, dupes))}")
    return result


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def strict_loads(data: bytes) -> Any:
    """JSON as RFC 8259 means it: UTF-8, no duplicate member names, no NaN or Infinity."""
    return _strict_loads(data)[0]


def _strict_loads(data: bytes) -> tuple[Any, bool]:
    """`strict_loads`, and whether the value is known to hold no lone surrogate (a `\\ud800` escape).

    orjson refuses lone surrogates, so a value from the orjson path has none; the stdlib accepts them.
    """
    # The common case without a Python hook per object: orjson parses (strict UTF-8, no NaN or Infinity), and
    # if encoding the result gives back the very same bytes, the text had no duplicate member (a duplicate is
    # a member the result lacks, so its encoding would be shorter). Compact tokens as issuers send them take
    # this path; anything else (spaces, escapes written another way, numbers orjson reads differently, a
    # duplicate) is decided by the stdlib path below alone. (Counting the text's quotes against the result's
    # strings instead costs more than the encoding: a type test per value is a rich comparison in C.)
    try:
        value = orjson.loads(data)
        if orjson.dumps(value) == data:
            return value, True
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise StrictJSONError("not UTF-8") from None
    try:
        return _DECODER.decode(text), False
    except StrictJSONError:
        raise
    except (ValueError, RecursionError):
        raise StrictJSONError("not valid JSON") from None


def _decode_object(segment: bytes, what: str) -> tuple[dict[str, Any], bool]:
    try:
        value, surrogate_free = _strict_loads(_b64decode(segment, what))
    except StrictJSONError as e:
        raise InvalidPayload(f"token {what} is not strict UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidPayload(f"token {what} is not a JSON object")
    return value, surrogate_free


def check_header(token: Unverified) -> None:
    """The header rules: no member that brings or points at a key, an `alg` string and a usable `kid`."""
    header = token.header
    banned = sorted(BANNED_HEADERS & header.keys())
    if banned:
        raise InvalidToken(f"token header member(s) {', '.join(banned)} are not accepted")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise InvalidToken("token header has no 'alg' string")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise InvalidToken("token header has no usable 'kid' (a short printable string naming the issuer's key)")


class Verifier:
    """Verification settings for one issuer, built once and reused for every token of that issuer."""

    def __init__(
        self,
        *,
        issuer_url: str,
        audience: str,
        algorithms: tuple[str, ...],
        leeway: int,
        clock: Callable[[], float],
    ) -> None:
        self.issuer_url = issuer_url
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = leeway
        self._clock = clock
        # Only the issuer's own algorithms; joserfc then refuses `none`, HMAC and everything else by name.
        self._registry = JWSRegistry(algorithms=list(algorithms), strict_check_header=False)
        # (id of a key, alg) -> (that key, its signature check): see _signature_check.
        self._checks: dict[tuple[int, str], tuple[Key, Callable[[bytes, bytes], bool]]] = {}

    def check_header(self, token: Unverified) -> None:
        """The header rules, and an algorithm this issuer signs with: both before any key is looked up."""
        check_header(token)
        if token.alg not in self.algorithms:
            raise InvalidToken(
                f"algorithm {token.alg!r} is not accepted for this issuer (accepted: {', '.join(self.algorithms)})"
            )

    def verify(self, token: Unverified, key: Key, *, header_checked: bool = False) -> VerifiedClaims:
        """The signature, then the claims. `header_checked`: the caller ran `check_header` on this very token
        (the exchange does, before it looks the key up), so it is not run twice."""
        if not header_checked:
            self.check_header(token)
        try:
            valid = self._signature_check(token.alg, key)(token.signing_input, token.signature)
        except (JoseError, ValueError, TypeError):
            raise InvalidToken(f"the key {token.kid!r} cannot verify a {token.alg} signature") from None
        if not valid:
            raise InvalidToken("signature does not verify with the issuer's key")
        self.check_claims(token.claims, surrogates=not token.surrogate_free)
        return VerifiedClaims(token.claims)

    def _signature_check(self, alg: str, key: Key) -> Callable[[bytes, bytes], bool]:
        """How `key` checks an `alg` signature: joserfc's algorithm, once it accepted the key for it.

        joserfc's key checks (the algorithm is one of the issuer's; the key's type, curve, `use`, `alg` and
        `key_ops` allow it) depend on nothing but the key and the algorithm, and a cached key never changes, so they
        run once per key and algorithm, not once per token. RS256, RS384 and RS512 then verify straight on the key's
        `cryptography` object, with the same padding and hash joserfc would pass; every other algorithm keeps
        joserfc's own verify.
        """
        found = self._checks.get((id(key), alg))
        if found is not None and found[0] is key:  # the key itself, not one that reused a dead key's id
            return found[1]
        algorithm = self._registry.get_alg(alg)
        algorithm.check_key(key)
        check: Callable[[bytes, bytes], bool]
        if alg in _PKCS1_HASHES:
            check = _pkcs1_check(key.get_op_key("verify"), _PKCS1_HASHES[alg]())
        else:
            check = functools.partial(_joserfc_check, algorithm, key)
        if len(self._checks) >= _MAX_CHECKS:
            # Key sets are small and rotate rarely; a refresh brings new key objects, so the old ones' entries go.
            self._checks.clear()
        self._checks[(id(key), alg)] = (key, check)
        return check

    def check_claims(self, claims: Mapping[str, Any], *, surrogates: bool = True) -> None:
        get = claims.get
        if None in map(get, REQUIRED_CLAIMS):  # no comprehension's frame when none is missing
            missing = [name for name in REQUIRED_CLAIMS if get(name) is None]
            raise InvalidToken(f"token is missing required claim(s): {', '.join(missing)}")
        aud = claims["aud"]
        if not isinstance(aud, str):
            raise InvalidToken(f"'aud' must be the single string {self.audience!r}, not a {_json_type(aud)}")
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if name in claims and not _is_time(value):
                raise InvalidToken(f"{name!r} must be a NumericDate (seconds since the epoch), not {_json_type(value)}")
        for name in ("iss", "jti", "sub"):
            if name in claims and not isinstance(claims[name], str):
                raise InvalidToken(f"{name!r} must be a string, not {_json_type(claims[name])}")
        if not claims["jti"]:
            raise InvalidToken("'jti' must be a non-empty string")
        where = _surrogate(claims) if surrogates else None
        if where is not None:
            # JSON's \ud800 escapes decode to lone surrogates, which are not text: no UTF-8 encoder (the minted
            # token's, a log's) takes them. Refused here, before any publisher, jti or mint sees them.
            raise InvalidToken(
                f"claim {where!r} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
            )
        clock = self._clock()
        if claims["exp"] > clock + MAX_LIFETIME:
            raise InvalidToken("'exp' is more than a year away; CI ID tokens live minutes to hours")
        # The registered claims' values, as joserfc's JWTClaimsRegistry checks them (its rules and its order, on
        # a `now` truncated to the second), written out: the types above leave only comparisons, and the
        # registry's generic walk cost more than all of them.
        now = int(clock)
        if claims["iss"] != self.issuer_url:
            raise InvalidToken(self._claim_problem("iss", claims))
        if aud != self.audience:
            raise InvalidToken(self._claim_problem("aud", claims))
        if claims["exp"] <= now - self.leeway:
            raise InvalidToken(
                f"token expired at {_iso(claims['exp'])} (now {_iso(clock)}, leeway {self.leeway} s); "
                "request a fresh ID token in the job that uploads"
            )
        if "nbf" in claims and claims["nbf"] > now + self.leeway:
            raise InvalidToken(self._claim_problem("nbf", claims))
        if claims["iat"] > now + self.leeway:
            raise InvalidToken(self._claim_problem("iat", claims))

    def _claim_problem(self, name: str, claims: Mapping[str, Any]) -> str:
        now = _iso(self._clock())
        if name == "aud":
            return f"'aud' is {claims['aud']!r}; this gateway accepts only {self.audience!r}"
        if name == "iss":
            return f"'iss' does not equal {self.issuer_url!r}"
        if name == "nbf":
            return f"token is not valid before {_iso(claims['nbf'])} (now {now}, leeway {self.leeway} s)"
        if name == "iat":
            return f"token was issued in the future at {_iso(claims['iat'])} (now {now}, leeway {self.leeway} s)"
        return f"claim {name!r} is invalid"


# RSASSA-PKCS1-v1_5 (RFC 7518 section 3.3), as joserfc's RSAAlgorithm signs and verifies it.
_PKCS1_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
}
_PKCS1 = padding.PKCS1v15()
# Far more than the keys of every issuer's current and previous sets, verified with each of their algorithms.
_MAX_CHECKS = 256


def _pkcs1_check(public_key: Any, hash_algorithm: hashes.HashAlgorithm) -> Callable[[bytes, bytes], bool]:
    verify = public_key.verify
    # The digest by hashlib, passed as Prehashed: the same hash, without a cryptography Hash object per token.
    digest = getattr(hashlib, hash_algorithm.name)
    prehashed = Prehashed(hash_algorithm)

    def check(signing_input: bytes, signature: bytes) -> bool:
        try:
            verify(signature, digest(signing_input).digest(), _PKCS1, prehashed)
        except InvalidSignature:
            return False
        return True

    return check


def _joserfc_check(algorithm: Any, key: Key, signing_input: bytes, signature: bytes) -> bool:
    return bool(algorithm.verify(signing_input, signature, key))


def _iso(seconds: float) -> str:
    """A NumericDate as ISO 8601 UTC, to the second, for descriptions a person reads."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        # Outside what the platform's gmtime covers (year 10000 and beyond): the number says it as well.
        return f"{seconds} (seconds since the epoch)"


def _surrogate(value: object, where: str = "") -> str | None:
    """Where in a claims object a lone surrogate sits (a claim name, with a path into lists and objects), or None."""
    if isinstance(value, str):
        # isascii is a C loop over the string; nearly every claim value is ASCII and needs no more.
        return None if value.isascii() or not _SURROGATE.search(value) else where
    if isinstance(value, dict):
        for name, member in value.items():
            path = f"{where}.{name}" if where else name
            if not name.isascii() and _SURROGATE.search(name):
                return path
            found = _surrogate(member, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, member in enumerate(value):
            found = _surrogate(member, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def _is_time(value: object) -> bool:
    # Bounded like a float's exact integers: 10**400 is a JSON integer, but not a time anyone can compute with.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return abs(float(value)) < 2**53  # False for NaN and the infinities too
    except OverflowError:
        return False


def _json_type(value: object) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
