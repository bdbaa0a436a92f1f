"""The operator's durable state: identities pinned on first use, and emergency revocations.

Both answer one question on the hot path (is this repository pinned to other ids? is it revoked for a token
issued at this time?) from an in-process copy, refreshed at most once a second, so a mint costs no round trip to
Redis or the disk for them. What changes the state (the CLI, a first mint) writes through to the shared place at
once; every replica notices within about a second, because the first check after a second goes to look:

    RedisState  `{prefix}revocations` (one JSON document, changed only by compare-and-set, so two operators
                revoking at once lose nothing), `{prefix}pin:<sha256>` (one key per pinned repository, written with
                a first-writer-wins script) and `{prefix}pins:version` (a new random value on each `pins forget`).
                Every command touches one key, so it works on Redis Cluster too, and the commands are only GET,
                SET, DEL and EVAL (with SCAN for `pins list`): what a Redis user limited to the prefix may run.
    FileState   `[gateway] state_file`, a JSON document replaced atomically (temporary file + rename) under an
                exclusive lock (flock on `<state_file>.lock`), so the CLI and several processes never lose each
                other's writes; the running gateway notices a changed file by its stat.

Pins and revocations name an issuer by its URL (what signs the tokens), never by its config name, which an
operator may reuse for another issuer; repositories are folded as matching folds them (ASCII case-insensitive).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from .publishers import fold, same_folded

__all__ = [
    "FileState",
    "Pin",
    "RedisState",
    "Revocation",
    "State",
    "StateUnavailable",
    "pin_key",
]

log = logging.getLogger(__name__)
audit_log = logging.getLogger("gateway.audit")

T = TypeVar("T")

# How stale the in-process copy may be before a check goes to look: revocations are honoured within this (plus
# one round trip) on every replica.
REFRESH = 1.0
# Pins kept in process; beyond, the oldest are dropped and read again from the shared place when needed.
MAX_CACHED_PINS = 200_000


class StateUnavailable(Exception):
    """The shared state could not be read or written (Redis down, state file unreadable)."""


@dataclass(frozen=True, slots=True)
class Pin:
    """The ids a repository had at its first successful mint; later tokens must carry the same."""

    issuer_url: str
    repository: str
    repository_id: str | None
    owner_id: str | None
    pinned_at: float

    @property
    def key(self) -> str:
        return pin_key(self.issuer_url, self.repository)

    def same_ids(self, other: Pin) -> bool:
        return (self.repository_id, self.owner_id) == (other.repository_id, other.owner_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pin:
        return cls(
            issuer_url=str(data["issuer_url"]),
            repository=str(data["repository"]),
            repository_id=_optional_str(data.get("repository_id")),
            owner_id=_optional_str(data.get("owner_id")),
            pinned_at=float(data["pinned_at"]),
        )


@dataclass(frozen=True, slots=True)
class Revocation:
    """No token of this repository issued (`iat`) within [since, until] is honoured; a bound not given is open."""

    id: str
    issuer_url: str
    repository: str
    reason: str
    since: float | None = None
    until: float | None = None
    created: float = 0.0

    def covers(self, issuer_url: str, repository: str, iat: float) -> bool:
        return (
            self.issuer_url == issuer_url
            and same_folded(self.repository, repository)
            and (self.since is None or iat >= self.since)
            and (self.until is None or iat <= self.until)
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Revocation:
        return cls(
            id=str(data["id"]),
            issuer_url=str(data["issuer_url"]),
            repository=str(data["repository"]),
            reason=str(data["reason"]),
            since=_optional_float(data.get("since")),
            until=_optional_float(data.get("until")),
            created=float(data.get("created", 0.0)),
        )


def pin_key(issuer_url: str, repository: str) -> str:
    # Hashed: a fixed-size key whatever the path, and no URL in key names. Folded as matching folds, so the
    # pin holds for every spelling that would match the same publisher.
    folded = fold(repository)
    digest = hashlib.sha256(f"{issuer_url}\n{folded if folded is not None else repository}".encode()).hexdigest()
    return f"pin:{digest}"


def new_revocation_id() -> str:
    return secrets.token_hex(6)


def audit(event: str, **fields: Any) -> None:
    """An audit line for a change to the state (the same logger and shape as the mint audit lines)."""
    line = {"event": event, **fields}
    if audit_log.isEnabledFor(logging.INFO):
        audit_log.info(json.dumps(line, separators=(",", ":")), extra={"audit": line})


class State(Protocol):
    async def revoked(self, issuer_url: str, repository: str, iat: float) -> Revocation | None:
        """The revocation covering a token of this repository issued at `iat`, if any (from the cached copy)."""

    async def pin(self, pin: Pin) -> tuple[Pin, bool]:
        """Record `pin` unless the repository is pinned already (first writer wins): the pin in force, and
        whether it is the one just recorded."""

    async def revoke(self, revocation: Revocation) -> None: ...

    async def lift(self, revocation_id: str) -> Revocation | None: ...

    async def revocations(self) -> list[Revocation]:
        """Every revocation, read fresh from the shared place (for the CLI)."""

    async def pins(self) -> list[Pin]: ...

    async def forget(self, issuer_url: str, repository: str) -> Pin | None: ...

    async def aclose(self) -> None: ...


class _Cached:
    """The in-process copy both implementations check against, and its once-a-second refresh.

    The refresh is single-flight: requests arriving while it runs wait for it instead of starting their own.
    Until the state has been read once, checks fail closed (a replica must not mint for a repository it cannot
    know to be revoked), unless `fail_open` (the operator chose availability with `replay_fallback`). Once read,
    a failed refresh keeps the last copy and is retried a second later.
    """

    def __init__(self, *, fail_open: bool = False, refresh: float = REFRESH) -> None:
        self.fail_open = fail_open
        self.refresh_interval = refresh
        self._revoked: dict[tuple[str, str], tuple[Revocation, ...]] = {}
        self._pins: dict[str, Pin] = {}
        self._loaded = False
        self._next = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._warned = False

    def _set_revocations(self, revocations: Iterable[Revocation]) -> None:
        index: dict[tuple[str, str], list[Revocation]] = {}
        for revocation in revocations:
            folded = fold(revocation.repository)
            if folded is not None:
                index.setdefault((revocation.issuer_url, folded), []).append(revocation)
        self._revoked = {key: tuple(value) for key, value in index.items()}

    def _cache_pin(self, pin: Pin) -> None:
        if len(self._pins) >= MAX_CACHED_PINS:
            # Dicts keep insertion order: drop the oldest entry; it is read again when needed.
            self._pins.pop(next(iter(self._pins)))
        self._pins[pin.key] = pin

    async def _load(self) -> None:
        raise NotImplementedError

    def current(self) -> bool:
        """Whether the in-process copy is read and younger than the refresh interval: `fresh` has nothing to do.
        Checked before awaiting it on the mint path, where a coroutine per mint costs more than the check."""
        return self._loaded and time.monotonic() < self._next

    async def fresh(self) -> None:
        """Bring the in-process copy up to date if it is older than the refresh interval."""
        if time.monotonic() < self._next:
            if not self._loaded and not self.fail_open:
                # The last attempt failed and the next is not due yet: still nothing to check against.
                raise StateUnavailable("pins and revocations have not been read yet")
            return
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        refreshing = self._refreshing
        # shield: one request going away must not cancel the refresh the others wait for.
        await asyncio.shield(refreshing)

    async def _refresh(self) -> None:
        try:
            await self._load()
        except StateUnavailable as e:
            self._next = time.monotonic() + self.refresh_interval
            if not self._loaded and not self.fail_open:
                raise
            if not self._warned:
                log.warning("cannot read pins and revocations (%s); using the last copy read", e)
                self._warned = True
        else:
            self._loaded, self._warned = True, False
            self._next = time.monotonic() + self.refresh_interval
        finally:
            self._refreshing = None

    async def revoked(self, issuer_url: str, repository: str, iat: float) -> Revocation | None:
        if not self.current():
            await self.fresh()
        folded = fold(repository)
        for revocation in self._revoked.get((issuer_url, folded or ""), ()):
            if revocation.covers(issuer_url, repository, iat):
                return revocation
        return None

    def invalidate(self) -> None:
        """Look again at the next check (after a change this process made itself)."""
        self._next = 0.0


class RedisState(_Cached):
    """Pins and revocations in Redis, under the store's prefix, shared by every replica."""

    # First writer wins: the pin in force is returned, whoever wrote it.
    _PIN = """
        local held = redis.call('get', KEYS[1])
        if held then return held end
        redis.call('set', KEYS[1], ARGV[1])
        return ARGV[1]
    """
    # Compare-and-set: write ARGV[2] only if the key still holds ARGV[1] ('' for no key). A change to the
    # revocations is read, made and written back this way, and retried if someone else wrote in between.
    _SWAP = """
        local held = redis.call('get', KEYS[1]) or ''
        if held ~= ARGV[1] then return 0 end
        redis.call('set', KEYS[1], ARGV[2])
        return 1
    """
    _SWAP_TRIES = 20

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "gateway:",
        deadline: float = 3.0,
        on_error: Callable[[], None] = lambda: None,
        fail_open: bool = False,
        refresh: float = REFRESH,
    ) -> None:
        super().__init__(fail_open=fail_open, refresh=refresh)
        self.client = client
        self.prefix = prefix
        self.deadline = deadline
        self.on_error = on_error
        self._revocations_seen: bytes | None = None
        self._pins_version: bytes | None = None

    @property
    def _revocations_key(self) -> str:
        return self.prefix + "revocations"

    @property
    def _pins_version_key(self) -> str:
        return self.prefix + "pins:version"

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.deadline):
                return await command
        except (RedisError, OSError, TimeoutError) as e:
            self.on_error()
            raise StateUnavailable(str(e) or type(e).__name__) from None

    async def _load(self) -> None:
        # Two keys (two slots on a cluster), asked at once: one round trip of waiting. The revocations are a
        # small document; it is parsed again only when its bytes changed.
        held, pins_version = await asyncio.gather(
            self._call(self.client.get(self._revocations_key)),
            self._call(self.client.get(self._pins_version_key)),
        )
        if pins_version != self._pins_version:
            # A pin was forgotten somewhere: drop every cached pin, so the next mint reads it again.
            self._pins.clear()
            self._pins_version = pins_version
        if held != self._revocations_seen or not self._loaded:
            self._set_revocations(_parse_revocations(_revocations_document(held)))
            self._revocations_seen = held

    async def pin(self, pin: Pin) -> tuple[Pin, bool]:
        await self.fresh()
        cached = self._pins.get(pin.key)
        if cached is not None:
            return cached, False
        value = pin.to_json()
        held = await self._call(self.client.eval(self._PIN, 1, self.prefix + pin.key, value))
        held = held.decode() if isinstance(held, bytes) else held
        try:
            in_force = Pin.from_dict(json.loads(held))
        except (ValueError, KeyError, TypeError):
            raise StateUnavailable(f"the pin under {self.prefix + pin.key} is malformed") from None
        self._cache_pin(in_force)
        if held == value:
            audit(
                "pin",
                issuer_url=pin.issuer_url,
                repository=pin.repository,
                repository_id=pin.repository_id,
                owner_id=pin.owner_id,
            )
        return in_force, held == value

    async def _change_revocations(self, change: Callable[[dict[str, Any]], T]) -> T:
        """Apply `change` to the revocations document atomically (compare-and-set, retried on a race)."""
        for _ in range(self._SWAP_TRIES):
            held = await self._call(self.client.get(self._revocations_key))
            document = _revocations_document(held)
            result = change(document)
            value = json.dumps({"revocations": document}, separators=(",", ":"), sort_keys=True)
            old = held.decode() if isinstance(held, bytes) else (held or "")
            if await self._call(self.client.eval(self._SWAP, 1, self._revocations_key, old, value)):
                self.invalidate()
                return result
        raise StateUnavailable("the revocations kept changing under this update; try again")

    async def revoke(self, revocation: Revocation) -> None:
        def add(document: dict[str, Any]) -> None:
            document[revocation.id] = asdict(revocation)

        await self._change_revocations(add)

    async def lift(self, revocation_id: str) -> Revocation | None:
        def remove(document: dict[str, Any]) -> Revocation | None:
            held = document.pop(revocation_id, None)
            revocations = _parse_revocations({revocation_id: held}) if held is not None else []
            return revocations[0] if revocations else None

        return await self._change_revocations(remove)

    async def revocations(self) -> list[Revocation]:
        held = await self._call(self.client.get(self._revocations_key))
        return sorted(_parse_revocations(_revocations_document(held)), key=lambda r: r.created)

    async def pins(self) -> list[Pin]:
        pins = []
        # The prefix is the operator's: its glob characters must match only themselves.
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", self.prefix) + "pin:*"
        async for name in self.client.scan_iter(match=pattern, count=1000):
            held = await self._call(self.client.get(name))
            with contextlib.suppress(ValueError, KeyError, TypeError):
                pins.append(Pin.from_dict(json.loads(held)))
        return sorted(pins, key=lambda p: (p.issuer_url, p.repository.lower()))

    async def forget(self, issuer_url: str, repository: str) -> Pin | None:
        name = self.prefix + pin_key(issuer_url, repository)
        held = await self._call(self.client.get(name))
        if held is None:
            return None
        await self._call(self.client.delete(name))
        # A new value, not a count: replicas only compare it with the one they saw.
        await self._call(self.client.set(self._pins_version_key, secrets.token_hex(8)))
        self._pins.pop(pin_key(issuer_url, repository), None)
        self.invalidate()
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return Pin.from_dict(json.loads(held))
        return Pin(issuer_url, repository, None, None, 0.0)

    async def aclose(self) -> None:
        # The client belongs to the replay store, which closes it.
        return None


class FileState(_Cached):
    """Pins and revocations in one JSON file, for a gateway without Redis (and its CLI).

    `path` None keeps them in this process only (settings built in code, without a config file).
    """

    def __init__(self, path: Path | None, *, refresh: float = REFRESH) -> None:
        super().__init__(refresh=refresh)
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._memory: dict[str, Any] = {"pins": {}, "revocations": {}}

    @property
    def _lock_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".lock")

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateUnavailable(f"{self.path}: {e.strerror}") from None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _read(self) -> dict[str, Any]:
        """The whole document (empty if the file does not exist yet)."""
        if self.path is None:
            return self._memory
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {"pins": {}, "revocations": {}}
        except (OSError, UnicodeDecodeError) as e:
            raise StateUnavailable(f"{self.path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        try:
            document = json.loads(text)
        except ValueError as e:
            raise StateUnavailable(f"{self.path} is not valid JSON ({e}); fix or restore it") from None
        if (
            not isinstance(document, dict)
            or not isinstance(document.get("pins", {}), dict)
            or not isinstance(document.get("revocations", {}), dict)
        ):
            raise StateUnavailable(f"{self.path} is not a gateway state file (no 'pins' and 'revocations' objects)")
        return {"pins": document.get("pins", {}), "revocations": document.get("revocations", {})}

    def _write(self, document: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        directory = self.path.parent
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        except OSError as e:
            raise StateUnavailable(f"cannot write beside {self.path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # Atomic: a reader sees the old document or the new one, never half of one.
            os.replace(temporary, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise StateUnavailable(f"cannot write {self.path}: {e.strerror}") from None

    @contextlib.contextmanager
    def _locked(self) -> Any:
        """Exclusive across processes and threads (each open file description holds its own flock)."""
        if self.path is None:
            yield
            return
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateUnavailable(f"cannot lock {self._lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def _offload(self, function: Callable[..., T], *args: Any) -> T:
        """File work in a thread (a large state file must not stall the event loop); the in-memory document,
        which the event loop reads too, is changed on the loop itself."""
        if self.path is None:
            return function(*args)
        return await asyncio.to_thread(function, *args)

    def _update(self, change: Callable[[dict[str, Any]], tuple[T, bool]]) -> T:
        """Read, change and write the document under the lock; `change` returns what the caller gets, and
        whether it changed the document (an unchanged one is not written)."""
        with self._locked():
            document = self._read()
            result, changed = change(document)
            if changed:
                self._write(document)
            return result

    async def _load(self) -> None:
        if self.path is None:
            self._apply(self._memory)
            return
        stamp = self._stat()
        if stamp == self._stamp and self._loaded:
            return
        document = await asyncio.to_thread(self._read)
        self._apply(document)
        self._stamp = stamp

    def _apply(self, document: Mapping[str, Any]) -> None:
        self._set_revocations(_parse_revocations(document["revocations"]))
        pins = {}
        for key, data in document["pins"].items():
            try:
                pins[key] = Pin.from_dict(data)
            except (ValueError, KeyError, TypeError):
                # Not cached, so a mint for it reads the file again and fails closed on the same entry.
                log.error(
                    "malformed pin %s in %s; mints of its repository are refused until it is fixed", key, self.path
                )
        self._pins = pins

    async def pin(self, pin: Pin) -> tuple[Pin, bool]:
        await self.fresh()
        cached = self._pins.get(pin.key)
        if cached is not None:
            return cached, False

        def record(document: dict[str, Any]) -> tuple[Pin, bool]:
            held = document["pins"].get(pin.key)
            if held is not None:
                try:
                    return Pin.from_dict(held), False
                except (ValueError, KeyError, TypeError):
                    raise StateUnavailable(f"the pin {pin.key} in {self.path} is malformed") from None
            document["pins"][pin.key] = asdict(pin)
            return pin, True

        in_force: Pin = await self._offload(self._update, record)
        self._cache_pin(in_force)
        if in_force is pin:
            audit(
                "pin",
                issuer_url=pin.issuer_url,
                repository=pin.repository,
                repository_id=pin.repository_id,
                owner_id=pin.owner_id,
            )
        return in_force, in_force is pin

    async def revoke(self, revocation: Revocation) -> None:
        def add(document: dict[str, Any]) -> tuple[None, bool]:
            document["revocations"][revocation.id] = asdict(revocation)
            return None, True

        await self._offload(self._update, add)
        self.invalidate()

    async def lift(self, revocation_id: str) -> Revocation | None:
        def remove(document: dict[str, Any]) -> tuple[Revocation | None, bool]:
            held = document["revocations"].pop(revocation_id, None)
            revocations = _parse_revocations({revocation_id: held}) if held is not None else []
            return (revocations[0] if revocations else None), held is not None

        lifted: Revocation | None = await self._offload(self._update, remove)
        self.invalidate()
        return lifted

    async def revocations(self) -> list[Revocation]:
        document = await self._offload(self._read)
        return sorted(_parse_revocations(document["revocations"]), key=lambda r: r.created)

    async def pins(self) -> list[Pin]:
        document = await self._offload(self._read)
        pins = []
        for data in document["pins"].values():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                pins.append(Pin.from_dict(data))
        return sorted(pins, key=lambda p: (p.issuer_url, p.repository.lower()))

    async def forget(self, issuer_url: str, repository: str) -> Pin | None:
        key = pin_key(issuer_url, repository)

        def remove(document: dict[str, Any]) -> tuple[Pin | None, bool]:
            held = document["pins"].pop(key, None)
            if held is None:
                return None, False
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return Pin.from_dict(held), True
            # A malformed pin is removed too; the caller still learns that something was forgotten.
            return Pin(issuer_url, repository, None, None, 0.0), True

        forgotten: Pin | None = await self._offload(self._update, remove)
        self._pins.pop(key, None)
        self.invalidate()
        return forgotten

    async def aclose(self) -> None:
        return None


async def upload_refusal(state: State, claims: Mapping[str, Any]) -> tuple[int, str] | None:
    """Why `/legacy/` must refuse a verified upload token (status, reason), or None to let it through.

    An upload token outlives the mint (token_ttl), so a revocation must reach tokens minted before it: those
    whose `iat` lies inside the window are refused, and each refusal is an audit line.
    """
    identity = claims.get("identity")
    if (
        not isinstance(identity, Mapping)
        or not isinstance(identity.get("issuer_url"), str)
        or not isinstance(identity.get("repository"), str)
    ):
        return 403, "the upload token names no identity (issuer_url and repository), so it cannot be checked"
    try:
        revocation = await state.revoked(identity["issuer_url"], identity["repository"], float(claims["iat"]))
    except StateUnavailable:
        return 503, "the gateway cannot read its revocations from the shared store yet; retry shortly"
    if revocation is None:
        return None
    audit(
        "upload",
        outcome="revoked",
        revocation=revocation.id,
        issuer_url=identity["issuer_url"],
        repository=identity["repository"],
        jti=claims.get("jti"),
    )
    return 403, (
        f"this upload token was minted for repository {identity['repository']!r}, which this gateway's operator "
        f"revoked (revocation {revocation.id}): {revocation.reason}"
    )


def _revocations_document(held: bytes | str | None) -> dict[str, Any]:
    """The revocations stored in Redis, by id ({} for none); a document that cannot be read is an error, never an
    empty list (that would lift every revocation)."""
    if held is None:
        return {}
    try:
        document = json.loads(held)
        revocations = document["revocations"]
    except (ValueError, KeyError, TypeError):
        raise StateUnavailable("the revocations stored in Redis are malformed; fix or delete the key") from None
    if not isinstance(revocations, dict):
        raise StateUnavailable("the revocations stored in Redis are malformed; fix or delete the key")
    return revocations


def _parse_revocations(entries: Mapping[Any, Any]) -> list[Revocation]:
    revocations = []
    for name, value in entries.items():
        try:
            data = json.loads(value) if isinstance(value, str | bytes) else value
            revocations.append(Revocation.from_dict(data))
        except (ValueError, KeyError, TypeError):
            # Never silently: a revocation that cannot be read is one that is not enforced.
            log.error("ignoring a malformed revocation %r in the shared state", name)
    return revocations


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
