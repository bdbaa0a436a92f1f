"""What every issuer kind shares: the configured Issuer record, the Kind interface, claim type checks.

Nothing here imports config: config imports the kinds and hands them their `[issuers.X]` table (a `tables.Table`)
to read their own keys from, so the import arrow runs one way (config -> issuers -> publishers, tables, identity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidToken
from ..identity import Identity
from ..publishers import Match
from ..tables import Table

# A value a `[issuers.X.deny]` list may hold: what TOML and JSON share exactly.
DenyValue = str | int | bool


@dataclass(frozen=True, slots=True)
class Issuer:
    """One `[issuers.NAME]` table as validated by config."""

    name: str
    url: str
    kind: str
    namespaces: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    # The bundle's certificates as read when the config was loaded: the trust the fetcher uses, and part of the
    # issuer's identity in shared state (keys.fetch.trust_id), so a bundle with other certificates is another issuer.
    ca_pem: bytes | None = field(default=None, repr=False)
    algorithms: tuple[str, ...] = ("RS256",)
    # Policy for every kind: a suspended issuer keeps its publishers but mints nothing.
    enabled: bool = True
    require_protected_ref: bool = False
    runner_environments: tuple[str, ...] | None = None
    # Record a repository's ids at its first mint and refuse later tokens with others (gateway.state).
    pin_on_first_use: bool = False
    # Every publisher of this issuer must pin repository_id and owner_id (checked at load).
    require_pins: bool = False
    # Seconds after `iat` a token is still accepted (no leeway), or None for no limit beyond `exp`.
    max_token_age: int | None = None
    # Raw claim -> values that refuse a token, in file order.
    deny: tuple[tuple[str, tuple[DenyValue, ...]], ...] = ()
    # `jwks_file`: the issuer's keys come from this file (its text, read at load), never from the network.
    jwks_file: Path | None = None
    jwks: str | None = field(default=None, repr=False)
    # What the kind read from its own keys (Kind.options), e.g. the generic kind's claim mapping.
    options: Any = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Kind:
    """What differs between issuer kinds: how claims become an Identity, and matching rules as data.

    `identity` turns verified claims into the Identity (raising InvalidToken or InvalidPublisher with a reason);
    `known_claims` are the claims the kind either maps or deliberately ignores, for `explain` and claim-drift
    tests; `workflow_problem` checks a publisher's `workflow` at load; `options`, if set, reads the kind's own
    keys from its `[issuers.X]` table (problems are reported through the table) and returns what `identity`
    finds as `issuer.options`; `check_match`, if set, is the kind's last word on a match (raising
    InvalidPublisher), given the raw claims.
    """

    name: str
    identity: Callable[[Issuer, Mapping[str, Any]], Identity]
    environment_case_sensitive: bool
    known_claims: Callable[[Issuer], frozenset[str]]
    options: Callable[[Table], Any] | None = None
    # What is wrong with a publisher's `workflow` for this kind (checked at load), or None.
    workflow_problem: Callable[[str], str | None] | None = None
    check_match: Callable[[Issuer, Mapping[str, Any], Match], None] | None = None
    # Raw claims `check_match` reads, for `check --replay` to say what an old audit line cannot re-decide.
    match_claims: frozenset[str] = frozenset()


def check_claims(
    claims: Mapping[str, Any],
    required: Mapping[str, type],
    optional: Mapping[str, type],
    nullable: Mapping[str, type] = {},
) -> None:
    """Presence and JSON types of a kind's claims; strings stay strings (no `123` for `"123"`)."""
    # The common case in one pass: JSON values are exactly str, int, float, bool, list, dict or None, so an exact
    # type test is isinstance without a bool passing for an int.
    get = claims.get
    for name, kind in required.items():
        if type(get(name)) is not kind:
            break
    else:
        for name, kind in (*optional.items(), *nullable.items()):
            value = get(name)
            if value is not None and type(value) is not kind:
                break
        else:
            return
    # Something is missing or of another type: say which, in the tables' order.
    missing = [name for name in required if claims.get(name) is None]
    if missing:
        raise InvalidToken(f"token is missing required claim(s): {', '.join(missing)}")
    for table, allow_null in ((required, False), (optional, True), (nullable, True)):
        for name, kind in table.items():
            value = claims.get(name)
            if value is None and allow_null:
                continue
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise InvalidToken(f"claim {name!r} must be a {kind.__name__}, not {type(value).__name__}")
