from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import httpx
from joserfc.jwk import Key
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from . import config, logs
from .errors import GatewayError
from .exchange import Exchange
from .keys.shared import SharedKeys
from .metrics import Metrics
from .mint import generate_key
from .reload import Reloader
from .routes import MINT_PATH, Endpoints, gateway_error
from .runtime import Services, build
from .state import FileState, RedisState, State
from .store import MemoryStore, RedisStore, Store
from .upload import UploadProxy

log = logging.getLogger(__name__)


def create_app(
    settings: config.Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    store: Store | None = None,
    clock: Callable[[], float] | None = None,
    signing_key: Key | None = None,
    state: State | None = None,
) -> Starlette:
    """Build the app; every outside dependency can be passed in, and the rest comes from `settings`."""
    clock = clock or time.time
    ephemeral = None
    if signing_key is None and settings.signing_key is None:
        log.warning(
            "no signing_key configured: using an ephemeral key; minted tokens stop verifying on restart "
            "and replicas disagree (make one with `gateway keygen`)"
        )
        ephemeral = generate_key()
    if store is None:
        store = _default_store(settings, clock)
    metrics = Metrics()
    store.on_error = lambda: metrics.count(metrics.redis_errors)
    if state is None:
        state = default_state(settings, store)
    services = Services(
        clock=clock,
        transport=transport,
        shared_keys=SharedKeys(store.shared, clock=clock) if store.shared is not None else None,
        on_fetch=lambda issuer, outcome: metrics.count(metrics.fetches, issuer, outcome),
        on_lookup=lambda level: metrics.count(metrics.key_lookups, level),
        signing_key=signing_key,
        ephemeral_key=ephemeral,
        on_redis_error=store.on_error,
        store=store,
    )
    exchange = Exchange(build(settings, services), store=store, clock=clock, state=state)
    endpoints = Endpoints(exchange, metrics)
    # Always there: it answers 404 itself while no [upstream] is configured, so a reload can add one.
    upload = UploadProxy(exchange)
    endpoints.upload = upload
    reloader = Reloader(exchange, services, metrics.reloads, on_switch=settle_heap)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reloader.start()
        exchange.store.startup()
        drain_on_sigterm(endpoints, lambda: exchange.settings.drain_seconds)
        settle_heap()
        try:
            yield
        finally:
            endpoints.shutting_down = True
            await reloader.stop()
            await exchange.keys.aclose()
            await exchange.state.aclose()
            await exchange.store.aclose()
            await upload.aclose()
            # The audit lines of the last requests are on the log writer's queue: out before the process goes.
            logs.flush()

    app = Gateway(
        endpoints,
        routes=endpoints.routes(),
        exception_handlers={GatewayError: gateway_error},
        lifespan=lifespan,
    )
    app.state.exchange = exchange
    app.state.endpoints = endpoints
    app.state.reloader = reloader
    app.state.upload = upload
    return app


def settle_heap() -> None:
    """Put what the app holds for its lifetime (modules, config, the publishers index) out of the collector's sight.

    A full garbage collection walks every object that outlived the younger collections, and the app's own are
    most of them: in the mint handler, collections cost 4.2 us per mint with pauses up to 33 ms with 10
    publishers, and 6.1 us with pauses up to 81 ms with 100,000 (a p99 on its own); frozen, 2.8 us and under 6 ms
    for both. A frozen object is still freed when its last reference goes; only a reference cycle among frozen
    objects waits, for the next settle: every reload settles again (unfreezing first, so the cycles of the
    config it replaced are collected then).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Gateway(Starlette):
    """The app: Starlette, except that a token exchange goes straight to its endpoint.

    The mint endpoint answers every outcome itself (errors included, in the contract's shape), so the error and
    exception middleware and the router have nothing to add there; they cost a sixth of the endpoint's own Python
    time per mint. Anything that is not exactly `POST /_/oidc/mint-token` at the root takes Starlette's way.
    """

    def __init__(self, endpoints: Endpoints, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mint = endpoints.mint_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MINT_PATH and scope["method"] == "POST" and not scope.get(
            "root_path"
        ):
            await self._mint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def drain_on_sigterm(endpoints: Endpoints, seconds: Callable[[], float]) -> None:
    """On SIGTERM, report unready at once and keep serving for `drain_seconds`, then let the server stop.

    The server (uvicorn) has its SIGTERM handler in place when the app starts; this one goes in front of it and
    hands over after the drain, so a load balancer or Kubernetes sees /readyz fail before the listener closes.
    uvicorn then finishes the requests in flight. A second SIGTERM stops at once.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return  # not under a server that handles SIGTERM (tests drive the app directly)
    loop = asyncio.get_running_loop()

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if endpoints.shutting_down:
            previous(sig, frame)
            return
        endpoints.shutting_down = True
        loop.call_soon_threadsafe(loop.call_later, seconds(), previous, sig, frame)

    with contextlib.suppress(ValueError):  # only the main thread may set signal handlers
        signal.signal(signal.SIGTERM, on_sigterm)


def _default_store(settings: config.Settings, clock: Callable[[], float]) -> Store:
    if settings.redis_url is None:
        return MemoryStore(clock)
    return RedisStore.from_url(
        settings.redis_url,
        clock=clock,
        fallback=settings.replay_fallback,
        prefix=settings.redis_prefix,
        replica_acks=settings.redis_replica_acks,
        replica_ack_timeout=settings.redis_replica_ack_timeout,
        sentinel_password=settings.redis_sentinel_password,
    )


def default_state(settings: config.Settings, store: Store) -> State:
    """Pins and revocations where the replay store keeps its state: in its Redis, or else in the state file."""
    if isinstance(store, RedisStore):
        return RedisState(
            store.client,
            prefix=store.prefix,
            deadline=store.deadline,
            on_error=lambda: store.on_error(),
            fail_open=store.fallback is not None,
        )
    return FileState(settings.state_file)


def from_environment() -> Starlette:
    """The uvicorn factory: `gateway serve` passes the config path through $GATEWAY_CONFIG to each worker."""
    settings = config.load(config.config_path(None, os.environ))
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)
