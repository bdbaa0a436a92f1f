"""`gateway pins` and `gateway revoke`: the operator's hands on the state in gateway.state.

They change the same place the running gateway reads (its Redis, or the state file), so every replica sees a
change within its refresh interval without a reload. Issuers are named as in the config; the state keeps their
URLs, so a revocation still holds if the issuer's table is later renamed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from redis.exceptions import RedisError

from .app import _default_store, default_state
from .config import Issuer, Settings
from .publishers import fold
from .state import FileState, Pin, Revocation, State, StateUnavailable, audit, new_revocation_id

__all__ = ["pins_command", "revoke_command"]


class Usage(Exception):
    """A command line that cannot be carried out; the message says why."""


def pins_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.pins_command == "list":
        return _run(settings, lambda state: _list_pins(settings, state))
    return _run(settings, lambda state: _forget(settings, state, args))


def revoke_command(settings: Settings, args: argparse.Namespace) -> int:
    given = [name for name in ("issuer", "repository", "since", "until", "reason") if getattr(args, name)]
    if args.list or args.lift:
        if (args.list and args.lift) or given:
            return _fail("--list and --lift ID stand alone (no other options)")
        if args.list:
            return _run(settings, lambda state: _list_revocations(settings, state))
        return _run(settings, lambda state: _lift(settings, state, args.lift))
    try:
        revocation = _revocation(settings, args)
    except Usage as e:
        return _fail(str(e))
    return _run(settings, lambda state: _revoke(settings, state, revocation))


def _revocation(settings: Settings, args: argparse.Namespace) -> Revocation:
    issuer = _issuer(settings, args.issuer)
    repository = _repository(args.repository)
    if not args.reason or not args.reason.strip():
        raise Usage("--reason TEXT is required (it is shown to refused CI jobs and kept in the audit log)")
    since = _instant(args.since, "--since") if args.since else None
    until = _instant(args.until, "--until") if args.until else None
    if since is not None and until is not None and since > until:
        raise Usage("--since is after --until, so the window holds nothing")
    return Revocation(
        id=new_revocation_id(),
        issuer_url=issuer.url,
        repository=repository,
        reason=" ".join(args.reason.split()),
        since=since,
        until=until,
        created=time.time(),
    )


def _issuer(settings: Settings, name: str | None) -> Issuer:
    if not name:
        raise Usage("--issuer NAME is required (a table name in [issuers])")
    issuer = settings.issuers.get(name)
    if issuer is None:
        raise Usage(f"--issuer {name!r} names no issuer in [issuers] ({', '.join(settings.issuers)})")
    return issuer


def _repository(repository: str | None) -> str:
    if not repository:
        raise Usage("--repository PATH is required (e.g. group/project)")
    if fold(repository) is None or repository != repository.strip() or not repository.strip("/"):
        # Non-ASCII paths never match a publisher, so a revocation of one would hold nothing.
        raise Usage(f"--repository {repository!r} must be an ASCII path like group/project")
    return repository


def _instant(text: str, option: str) -> float:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Usage(f"{option} {text!r} is not an ISO 8601 time (like 2026-11-26T12:00:00Z)") from None
    if value.tzinfo is None:
        # A time without a zone means a different instant on every machine that reads it.
        raise Usage(f"{option} {text!r} has no zone; add Z or an offset like +01:00")
    return value.timestamp()


def _run(settings: Settings, action: Callable[[State], Awaitable[int]]) -> int:
    async def run() -> int:
        async with open_state(settings) as state:
            return await action(state)

    try:
        return asyncio.run(run())
    except Usage as e:
        return _fail(str(e))
    except (StateUnavailable, RedisError, OSError) as e:
        where = "Redis" if settings.redis_url else str(settings.state_file)
        return _fail(f"the gateway's state ({where}) is unavailable: {e}")


@asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[State]:
    """The state a gateway with these settings uses (its Redis, or its state file)."""
    if settings.redis_url is None:
        yield FileState(settings.state_file)
        return
    store = _default_store(settings, time.time)
    try:
        yield default_state(settings, store)
    finally:
        await store.aclose()


async def _revoke(settings: Settings, state: State, revocation: Revocation) -> int:
    await state.revoke(revocation)
    audit("revoke", **_fields(settings, revocation))
    print(f"revoked: {_line(settings, revocation)}")
    return 0


async def _lift(settings: Settings, state: State, revocation_id: str) -> int:
    lifted = await state.lift(revocation_id)
    if lifted is None:
        return _fail(f"no revocation has id {revocation_id!r} (see `gateway revoke --list`)")
    audit("lift", **_fields(settings, lifted))
    print(f"lifted: {_line(settings, lifted)}")
    return 0


async def _list_revocations(settings: Settings, state: State) -> int:
    for revocation in await state.revocations():
        print(_line(settings, revocation))
    return 0


async def _list_pins(settings: Settings, state: State) -> int:
    for pin in await state.pins():
        print(
            f"issuer={_issuer_name(settings, pin.issuer_url)} repository={pin.repository} "
            f"repository_id={pin.repository_id or '-'} owner_id={pin.owner_id or '-'} "
            f"pinned={_time(pin.pinned_at)}"
        )
    return 0


async def _forget(settings: Settings, state: State, args: argparse.Namespace) -> int:
    issuer = _issuer(settings, args.issuer)
    repository = _repository(args.repository)
    forgotten: Pin | None = await state.forget(issuer.url, repository)
    if forgotten is None:
        return _fail(f"no pin is recorded for repository {repository!r} of issuer {issuer.name!r}")
    audit(
        "pin-forget",
        issuer=issuer.name,
        issuer_url=issuer.url,
        repository=forgotten.repository,
        repository_id=forgotten.repository_id,
        owner_id=forgotten.owner_id,
    )
    print(
        f"forgot the pin of {forgotten.repository} (repository_id={forgotten.repository_id or '-'} "
        f"owner_id={forgotten.owner_id or '-'}); its next successful mint pins it again"
    )
    return 0


def _fields(settings: Settings, revocation: Revocation) -> dict[str, object]:
    return {
        "id": revocation.id,
        "issuer": _issuer_name(settings, revocation.issuer_url),
        "issuer_url": revocation.issuer_url,
        "repository": revocation.repository,
        "since": _time(revocation.since) if revocation.since is not None else None,
        "until": _time(revocation.until) if revocation.until is not None else None,
        "reason": revocation.reason,
    }


def _line(settings: Settings, revocation: Revocation) -> str:
    since = _time(revocation.since) if revocation.since is not None else "-"
    until = _time(revocation.until) if revocation.until is not None else "-"
    return (
        f"id={revocation.id} issuer={_issuer_name(settings, revocation.issuer_url)} "
        f"repository={revocation.repository} since={since} until={until} created={_time(revocation.created)} "
        f"reason={revocation.reason}"
    )


def _issuer_name(settings: Settings, url: str) -> str:
    issuer = settings.by_url.get(url)
    return issuer.name if issuer is not None else url


def _time(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat().replace("+00:00", "Z")


def _fail(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return 1
