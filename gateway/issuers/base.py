from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidToken
from ..identity import Identity

if TYPE_CHECKING:
    from ..config import Issuer, Table


@dataclass(frozen=True, slots=True)
class Kind:
    """What differs between issuer kinds: how claims become an Identity, and matching rules as data.

    `identity` turns verified claims into the Identity (raising InvalidToken or InvalidPublisher with a reason);
    `known_claims` are the claims the kind either maps or deliberately ignores, for `explain` and claim-drift
    tests; `workflow_problem` checks a publisher's `workflow` at load; `options`, if set, reads the kind's own
    keys from its `[issuers.X]` table (problems are reported through the table) and returns what `identity`
    finds as `issuer.options`.
    """

    name: str
    identity: Callable[[Issuer, Mapping[str, Any]], Identity]
    environment_case_sensitive: bool
    known_claims: Callable[[Issuer], frozenset[str]]
    options: Callable[[Table], Any] | None = None
    # What is wrong with a publisher's `workflow` for this kind (checked at load), or None.
    workflow_problem: Callable[[str], str | None] | None = None


def check_claims(
    claims: Mapping[str, Any],
    required: Mapping[str, type],
    optional: Mapping[str, type],
    nullable: Mapping[str, type] = {},
) -> None:
    """Presence and JSON types of a kind's claims; strings stay strings (no `123` for `"123"`)."""
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
