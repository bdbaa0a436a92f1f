"""Reloading issuers.toml and publishers.toml without a restart: on SIGHUP, and when a watched file changes.

A new config is loaded and validated whole before anything changes; a bad one is refused with its problems
logged, and the config in force stays. What cannot change in a running process (the Redis URL) is kept, with a
warning that it needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter

from . import config
from .errors import ConfigError
from .exchange import Exchange
from .mint import Signer
from .publishers import Publishers
from .ratelimit import rate_limits

log = logging.getLogger(__name__)


class Reloader:
    def __init__(
        self,
        exchange: Exchange,
        counter: Counter,
        *,
        load: Callable[[Path], config.Settings] = config.load,
    ) -> None:
        self.exchange = exchange
        self.counter = counter
        self.load = load
        self._stamps = self._stat(exchange.settings.files)
        self._task: asyncio.Task[None] | None = None
        self._signalled: set[asyncio.Task[bool]] = set()
        self._lock = asyncio.Lock()
        # The Redis the running store and rate limits use; a changed redis_url waits for a restart.
        self._redis_url = exchange.settings.redis_url

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
            # Remember the broken files, so the watch waits for the next change instead of retrying (and
            # logging) the same problems every interval.
            self._stamps = before
            self.counter.labels("failure").inc()
            log.error("config reload refused; the previous config stays in force:\n%s", "\n".join(e.problems))
            return False
        if settings.redis_url != self._redis_url:
            log.warning("redis_url changed; the new value takes effect only after a restart")
        signer = None
        keys_changed = (settings.signing_key, settings.previous_signing_keys) != (
            current.signing_key,
            current.previous_signing_keys,
        )
        if keys_changed and settings.signing_key is not None:
            signer = Signer(settings.signing_key, settings.previous_signing_keys)
        self.exchange.reconfigure(settings, signer, publishers)
        if (settings.rate_limit_client, settings.rate_limit_repository) != (
            current.rate_limit_client,
            current.rate_limit_repository,
        ):
            # On the Redis in force (the one the store uses), whatever the new file says.
            old, self.exchange.limits = self.exchange.limits, rate_limits(settings, redis_url=self._redis_url)
            if self.exchange.limits is not None:
                self.exchange.limits.on_error = self.exchange.store.on_error
            if old is not None:
                await old.aclose()
        self._stamps = {**self._stat(settings.files), **{f: v for f, v in before.items() if f in settings.files}}
        self.counter.labels("success").inc()
        log.info(
            "config reloaded: %d issuer(s), %d publisher(s)", len(settings.issuers), len(settings.publishers)
        )
        return True

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
