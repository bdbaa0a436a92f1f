"""Everything a config implies, built by one function and switched to in one step.

`build` turns `Settings` into a frozen `Runtime`: verifiers, publishers, the key cache with its policy for both tiers,
the signer, rate limits. `create_app` calls it once and the reloader calls it for every reload, so no setting can be
applied at start and forgotten by a reload. The exchange reads the runtime through one attribute, so a request sees
one config from start to end, and a reload is an assignment, not a series of patches a request could fall between.

What one process cannot change while it runs (`RESTART_ONLY`) is refused by `restart_needed`, naming the setting,
instead of being ignored: the caller refuses the whole reload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from joserfc.jwk import Key

from .config import Settings
from .jose import Verifier
from .keys.cache import Keys
from .keys.fetch import KeyPolicy
from .keys.shared import SharedKeys
from .mint import Signer
from .publishers import Publishers
from .ratelimit import RateLimits, rate_limits
from .store import Store

__all__ = ["RESTART_ONLY", "Runtime", "Services", "build", "key_policy", "restart_needed"]

# Settings bound into objects that live as long as the process: the Redis connection of the store and of the rate
# limits (redis_url), the names every shared key is written under (redis_prefix), and the store's fallback
# (replay_fallback), and the file pins and revocations live in without Redis (state_file). A reload changing one
# is refused whole.
RESTART_ONLY = ("redis_url", "redis_prefix", "replay_fallback", "state_file")


@dataclass(frozen=True, slots=True)
class Services:
    """What a process keeps whatever its config: the collaborators each build is made from."""

    clock: Callable[[], float]
    transport: httpx.AsyncBaseTransport | None = None
    # The replica-shared key tier (with Redis), and observers for metrics (see keys.cache.Keys).
    shared_keys: SharedKeys | None = None
    on_fetch: Callable[[str, str], None] | None = None
    on_lookup: Callable[[str], None] | None = None
    # A signing key passed to create_app (tests, `gateway explain`); it wins over the config's.
    signing_key: Key | None = None
    # The key used while no signing_key is configured (made once per process, with a warning).
    ephemeral_key: Key | None = None
    on_redis_error: Callable[[], None] = lambda: None
    # The replay store: the rate limits count in its Redis (one connection pool, its key prefix).
    store: Store | None = None


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    publishers: Publishers
    verifiers: Mapping[str, Verifier]
    keys: Keys
    signer: Signer
    limits: RateLimits | None


def key_policy(settings: Settings) -> KeyPolicy:
    return KeyPolicy(
        ttl=settings.keys_ttl,
        cooldown=settings.refresh_cooldown,
        max_age=settings.keys_max_age,
        timeout=settings.fetch_timeout,
        max_bytes=settings.fetch_max_bytes,
    )


def restart_needed(running: Settings, new: Settings) -> list[str]:
    """The restart-only settings that differ between the running config and a new one."""
    return [name for name in RESTART_ONLY if getattr(running, name) != getattr(new, name)]


def build(
    settings: Settings,
    services: Services,
    previous: Runtime | None = None,
    *,
    publishers: Publishers | None = None,
) -> Runtime:
    """The runtime `settings` imply, reusing from `previous` what they leave unchanged (cached keys of issuers of
    unchanged trust, the signer, the rate limits and their counts). Changes nothing that is in use."""
    policy = key_policy(settings)
    if previous is not None:
        keys = previous.keys.rebuilt(settings.issuers, policy)
    else:
        keys = Keys(
            settings.issuers,
            policy,
            clock=services.clock,
            transport=services.transport,
            shared=services.shared_keys,
            on_fetch=services.on_fetch,
            on_lookup=services.on_lookup,
        )
    verifiers = {
        name: Verifier(
            issuer_url=issuer.url,
            audience=settings.audience,
            algorithms=issuer.algorithms,
            leeway=settings.leeway,
            clock=services.clock,
        )
        for name, issuer in settings.issuers.items()
    }
    return Runtime(
        settings=settings,
        publishers=publishers if publishers is not None else Publishers(settings.publishers),
        verifiers=verifiers,
        keys=keys,
        signer=_signer(settings, services, previous),
        limits=_limits(settings, services, previous),
    )


def _signer(settings: Settings, services: Services, previous: Runtime | None) -> Signer:
    key = services.signing_key or settings.signing_key
    if previous is not None:
        unchanged = (settings.signing_key, settings.previous_signing_keys) == (
            previous.settings.signing_key,
            previous.settings.previous_signing_keys,
        )
        # A reload that drops signing_key keeps the key in use: tokens minted with it must keep verifying.
        if key is None or unchanged:
            return previous.signer
    if key is None:
        key = services.ephemeral_key
    if key is None:
        raise ValueError("no signing key: neither configured nor passed, and no ephemeral key was made")
    return Signer(key, settings.previous_signing_keys)


def _limits(settings: Settings, services: Services, previous: Runtime | None) -> RateLimits | None:
    wanted = (settings.rate_limit_client, settings.rate_limit_repository)
    if previous is not None and wanted == (
        previous.settings.rate_limit_client,
        previous.settings.rate_limit_repository,
    ):
        return previous.limits
    limits = rate_limits(settings, services.store, clock=services.clock)
    if limits is not None:
        limits.on_error = services.on_redis_error
    return limits
