"""`gateway explain`: verify a token as mint-token would, without spending its jti, and say what it would mint.

The app's own pieces do the work (`create_app(settings)`'s Exchange: verify, candidates, compare, match), so the
explanation cannot drift from what the gateway decides. Only the store is never asked to spend; the token is never
printed, only what was read from it after its signature held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .app import create_app
from .config import Settings
from .errors import GatewayError, IssuerUnavailable
from .exchange import Exchange, Verified
from .identity import FIELDS
from .issuers import KINDS, Issuer
from .jose import peek
from .mint import generate_key
from .publishers import Publisher, compare
from .store import MemoryStore, Store


async def explain(
    settings: Settings,
    token: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] | None = None,
    store: Store | None = None,
) -> tuple[int, str]:
    """Explain what mint-token would do with this token: 0 and the text if a publisher matches, else 1."""
    clock = clock or time.time
    # An in-process store unless one is given: explain never spends, so it has no reason to reach Redis.
    own_store = store is None
    used_store = store if store is not None else MemoryStore(clock)
    # A throwaway signing key: nothing is minted, and the configured key need not be readable by whoever explains.
    app = create_app(settings, transport=transport, store=used_store, clock=clock, signing_key=generate_key())
    exchange: Exchange = app.state.exchange
    lines: list[str] = []
    try:
        code = await _explain(exchange, token, lines)
    finally:
        await exchange.keys.aclose()
        if own_store:
            await used_store.aclose()
    return code, "\n".join(lines) + "\n"


async def _explain(exchange: Exchange, token: str, lines: list[str]) -> int:
    issuer = _issuer(exchange.settings, token)
    if issuer is not None:
        lines.append(f"issuer: {issuer.name} ({issuer.url}, kind {issuer.kind})")
    try:
        verified = await exchange.verify(token)
    except GatewayError as e:
        lines.append(f"verification: FAILED {e.code}: {e.description}")
        if isinstance(e, IssuerUnavailable) and issuer is not None:
            upstream = exchange.keys.state(issuer.name).last_error
            if upstream:
                lines.append(f"  upstream: {upstream}")
        return 1
    claims, identity = verified.claims, verified.identity
    kind = KINDS[verified.issuer.kind]
    lines.append(f"verification: ok (kid {peek(token).kid!r}; expires in {round(claims['exp'] - exchange.clock())} s)")
    lines.append("identity:")
    width = max(map(len, FIELDS))
    lines += [f"  {name:<{width}}  {_value(getattr(identity, name))}" for name in FIELDS]
    ignored = sorted(set(claims) - kind.known_claims(verified.issuer))
    lines.append(f"ignored claims (unknown to the {kind.name} kind): {', '.join(ignored) or 'none'}")
    lines.append(_pin_advice(exchange, verified, _OWNER_ID))
    lines.append(_pin_advice(exchange, verified, _REPOSITORY_ID))
    return _publishers(exchange, verified, lines)


@dataclass(frozen=True, slots=True)
class _PinWording:
    """How the advice line of one pinnable identity field reads."""

    field: str  # the Identity and Publisher attribute, and the publishers.toml key
    what: str  # "owner id", "repository id"
    held_by: str  # which of the token's ids an existing pin was checked against
    taken_over: str  # what a pin to another id may mean
    refuses: str  # what a publisher pinning this field refuses


_OWNER_ID = _PinWording(
    "owner_id",
    "owner id",
    "this token's owner id",
    "The repository path may now belong to another owner",
    "refuses this repository path if it ever belongs to another owner",
)
_REPOSITORY_ID = _PinWording(
    "repository_id",
    "repository id",
    "this token's id",
    "The project may have been deleted and re-created under this path",
    "refuses a project deleted and re-created under this path",
)


def _pin_advice(exchange: Exchange, verified: Verified, wording: _PinWording) -> str:
    """The line for one pinnable id: a pin to propose, or why none is proposed.

    A publisher already pinned to another id is the case the pin exists for (the repository path may now belong to
    someone else, or to a re-created project), so the token's id is never proposed over it.
    """
    name = wording.field
    value: str | None = getattr(verified.identity, name)
    if value is None:
        return f"{name} to pin: none (the token carries no {wording.what})"
    pinned = [p for p in exchange.publishers.candidates(verified.identity) if getattr(p, name) is not None]
    others = [p for p in pinned if getattr(p, name) != value]
    if others:
        names = ", ".join(f"{_name(exchange, p)} pins {getattr(p, name)!r}" for p in others)
        return (
            f"{name} to pin: none proposed: {names}, but this token's {wording.what} is {value!r}. "
            f"{wording.taken_over}; find out who owns it before changing any pin"
        )
    if pinned:
        return f"{name} to pin: already pinned to {value!r}, which {wording.held_by} equals"
    return f"{name} to pin: {value} ({name} = {json.dumps(value)} in a publisher {wording.refuses})"


def _issuer(settings: Settings, token: str) -> Issuer | None:
    try:
        return settings.by_url.get(peek(token).issuer)
    except GatewayError:
        # verify() reports the same problem with the same words next.
        return None


def _publishers(exchange: Exchange, verified: Verified, lines: list[str]) -> int:
    identity = verified.identity
    kind = KINDS[verified.issuer.kind]
    candidates = exchange.publishers.candidates(identity)
    lines.append(f"publishers for repository {identity.repository!r} of issuer {identity.issuer!r}: {len(candidates)}")
    results = [
        (publisher, compare(publisher, identity, environment_case_sensitive=kind.environment_case_sensitive))
        for publisher in candidates
    ]
    matched = [publisher for publisher, comparisons in results if all(c.ok for c in comparisons)]
    # The nearest miss as Publishers.match picks it: fewest differing fields, first in file order.
    nearest = None if matched or not results else min(results, key=lambda r: sum(not c.ok for c in r[1]))[0]
    for publisher, comparisons in results:
        mark = "  <- nearest miss" if publisher is nearest else ""
        lines.append(f"  {_name(exchange, publisher)}: projects {', '.join(publisher.projects)}{mark}")
        lines.append(f"    {'issuer':<12} match ({publisher.issuer})")
        lines.append(f"    {'repository':<12} match ({publisher.repository}, compared case-insensitively)")
        for c in comparisons:
            if not c.ok:
                lines.append(f"    {c.field:<12} MISMATCH expected {_value(c.expected)}, token has {_value(c.got)}")
            elif c.field == "environment" and publisher.environment is None:
                lines.append(f"    {c.field:<12} match (the publisher accepts any; token has {_value(c.got)})")
            else:
                lines.append(f"    {c.field:<12} match ({_value(c.got)})")
    try:
        match = exchange.match(verified)
    except GatewayError as e:
        lines.append(f"result: no publisher matches; mint-token would refuse with {e.code}: {e.description}")
        return 1
    winners = ", ".join(_name(exchange, p) for p in match.publishers)
    lines.append(f"result: matched by {winners}; mint-token would grant projects {', '.join(match.projects)}")
    passed_over = [p for p in matched if p not in match.publishers]
    if passed_over:
        lines.append(
            f"  also matching but not bound to an environment: {', '.join(_name(exchange, p) for p in passed_over)}; "
            "an environment-bound publisher wins, so their projects are not granted"
        )
    lines.append("  (the jti was neither checked nor spent: mint-token still refuses a token used once already)")
    return 0


def _name(exchange: Exchange, publisher: Publisher) -> str:
    # Numbered as in publishers.toml ("[[publisher]] #3", as config problems name them): every entry loaded, in order.
    number = exchange.settings.publishers.index(publisher) + 1
    environment = f", environment {publisher.environment!r}" if publisher.environment is not None else ""
    return f"[[publisher]] #{number} (workflow {publisher.workflow!r}{environment})"


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
