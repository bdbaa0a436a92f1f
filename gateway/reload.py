"""Reloading issuers.toml and publishers.toml without a restart: on SIGHUP, and when a watched file changes.

A new config is loaded and validated whole, and everything it implies is built (runtime.build), before anything
changes; then it is put in force in one step. A bad config is refused with its problems logged, and the config in
force stays. So is a config that changes a setting only a restart can apply (runtime.RESTART_ONLY): applying the
rest would leave a config in force that no file says, so the whole reload is refused, naming the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import Counter

from . import config
from .errors import ConfigError
from .exchange import Exchange
from .publishers import Publishers
from .runtime import Services, build, restart_needed
from .store import RedisStore

log = logging.getLogger(__name__)


class Reloader:
    def __init__(
        self,
        exchange: Exchange,
        services: Services,
        counter: Counter,
        *,
        load: Callable[[Path], config.Settings] = config.load,
        on_switch: Callable[[], None] = lambda: None,
    ) -> None:
        self.exchange = exchange
        self.services = services
        self.counter = counter
        self.load = load
        # Called once a new config is in force (the app settles its heap: app.settle_heap).
        self.on_switch = on_switch
        self._stamps = self._stat(exchange.settings.files)
        self._task: asyncio.Task[None] | None = None
        self._signalled: set[asyncio.Task[bool]] = set()
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Load the config again and switch to it; False (and the old config kept) if it has problems."""
        # One at a time: a reload that started later must not be overwritten by an earlier one finishing last.
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> bool:
        current = self.exchange.settings
        assert current.config_path is not None
        # Stamped before reading: a file changed while it is parsed is seen as changed again by the watch.
        before = self._stat(current.files)
        try:
            # In a thread: a large publishers file takes a second to parse, which the event loop must not wait.
            settings, publishers = await asyncio.to_thread(self._prepare, current.config_path)
        except ConfigError as e:
            return self._refuse(before, "config reload refused; the previous config stays in force:", e.problems)
        restart = restart_needed(current, settings)
        if restart:
            return self._refuse(
                before,
                "config reload refused whole; the previous config stays in force:",
                [f"{name} changed: {name} needs a restart (restart the process to apply it)" for name in restart],
            )
        previous = self.exchange.runtime
        try:
            runtime = build(settings, self.services, previous, publishers=publishers)
        except (OSError, ValueError) as e:  # a CA bundle OpenSSL cannot use (ssl.SSLError is an OSError)
            return self._refuse(before, "config reload refused; the previous config stays in force:", [str(e)])
        self.exchange.switch(runtime)
        if isinstance(self.exchange.store, RedisStore):
            # Live, unlike the rest of what names the Redis in use (RESTART_ONLY).
            self.exchange.store.reconfigure(
                replica_acks=settings.redis_replica_acks,
                replica_ack_timeout=settings.redis_replica_ack_timeout,
                sentinel_password=settings.redis_sentinel_password,
            )
        self._stamps = {**self._stat(settings.files), **{f: v for f, v in before.items() if f in settings.files}}
        self.counter.labels("success").inc()
        self.on_switch()
        log.info("config reloaded: %d issuer(s), %d publisher(s)", len(settings.issuers), len(settings.publishers))
        return True

    def _refuse(self, before: dict[Path, tuple[int, int] | None], message: str, problems: Sequence[str]) -> bool:
        # Remember the refused files, so the watch waits for the next change instead of retrying (and logging)
        # the same problems every interval.
        self._stamps = before
        self.counter.labels("failure").inc()
        log.error("%s\n%s", message, "\n".join(problems))
        return False

    def _prepare(self, path: Path) -> tuple[config.Settings, Publishers]:
        settings = self.load(path)
        return settings, Publishers(settings.publishers)

    def changed(self) -> bool:
        return self._stat(self.exchange.settings.files) != self._stamps

    @staticmethod
    def _stat(files: tuple[Path, ...]) -> dict[Path, tuple[int, int] | None]:
        stamps: dict[Path, tuple[int, int] | None] = {}
        for file in files:
            try:
                info = file.stat()
                stamps[file] = (info.st_mtime_ns, info.st_size)
            except OSError:
                stamps[file] = None
        return stamps

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                # A file caught half-written is refused; finishing the write changes it again, which reloads.
                await self.reload()

    def start(self) -> None:
        interval = self.exchange.settings.reload_interval
        if interval > 0:
            self._task = asyncio.create_task(self._watch(interval), name="config:watch")
        # Only the main thread of a process can take signals (tests drive the app in other ways).
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_signal)

    def _on_signal(self) -> None:
        task = asyncio.create_task(self.reload(), name="config:sighup")
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
