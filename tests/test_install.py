"""A server install from this checkout beside current index tools, in a fresh virtualenv, as an index operator makes it.

Slow-ish (one venv, pip's resolver; wheels come from pip's cache after the first run), so it is marked `slow`
(deselect with `-m "not slow"`). pip reaches the package registry and nothing else: it goes through a CONNECT
proxy of this test's own that refuses every other host, and the import check runs without any network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import free_port

REPOSITORY = Path(__file__).resolve().parent.parent
# pip's default registry: the index and the host its files are served from.
REGISTRY = {"pypi.org", "files.pythonhosted.org"}
SERVER_MODULES = {"starlette", "uvicorn", "redis", "limits", "prometheus_client", "trustme", "coredis"}


class RegistryProxy:
    """An HTTPS (CONNECT) proxy on loopback that tunnels to the registry's hosts only; it records every host asked."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[str] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._tunnel(reader, writer)
        finally:
            writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            host, _, port = target.rpartition(":")
            self.asked.append(host)
            if method != "CONNECT" or host not in self.allowed or port != "443":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(host, 443)
            try:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                upstream_writer.close()

    def __enter__(self) -> RegistryProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's sources as committed in this checkout, copied so a build leaves nothing in the working tree."""
    target = tmp_path_factory.mktemp("checkout") / "gateway"
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, target / name)
    shutil.copytree(REPOSITORY / "gateway", target / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, checkout: Path) -> Iterator[Path]:
    """A fresh venv with `pip install . twine==7.* pypiserver==2.4.* packaging>=26`, through the registry proxy."""
    directory = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True, timeout=120)
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.lower().endswith("_proxy") and not name.startswith(("PYTHON", "VIRTUAL_ENV", "GATEWAY_"))
    }
    with RegistryProxy(REGISTRY | _configured_index_hosts()) as proxy:
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        result = subprocess.run(
            [
                str(directory / "bin" / "python"), "-m", "pip", "install", "--no-input", "--progress-bar", "off",
                str(checkout), "twine==7.*", "pypiserver==2.4.*", "packaging>=26",
            ],
            env=environ | {"HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "PIP_NO_INPUT": "1"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )  # fmt: skip
    assert result.returncode == 0, f"the install did not resolve:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    # pip went through the proxy (so the restriction held), and asked for the registry's hosts only.
    assert proxy.asked, "pip did not use the proxy"
    assert set(proxy.asked) <= REGISTRY | _configured_index_hosts(), proxy.asked
    yield directory


def _configured_index_hosts() -> set[str]:
    """The host of $PIP_INDEX_URL, when this machine points pip at a registry mirror instead of PyPI."""
    from urllib.parse import urlsplit

    url = os.environ.get("PIP_INDEX_URL")
    return {urlsplit(url).hostname or ""} - {""} if url else set()


def offline(command: list[str]) -> list[str]:
    """`command` without any network (a network namespace of its own) where the system allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False).returncode == 0:
        return [unshare, "-rn", *command]
    return command


@pytest.mark.slow
def test_server_install_resolves_beside_current_tools(venv: Path) -> None:
    """The gateway installs from this checkout together with twine 7, pypiserver 2.4 and packaging 26."""
    python = str(venv / "bin" / "python")
    result = subprocess.run(
        offline([python, "-c", "import importlib.metadata as m; print(m.version('twine'), m.version('pypiserver'), "
                 "m.version('packaging'), m.version('gateway'))"]),
        capture_output=True, text=True, timeout=60, check=True, cwd=venv,
    )  # fmt: skip
    twine, pypiserver, packaging, _ = result.stdout.split()
    assert twine.startswith("7.") and pypiserver.startswith("2.4.") and int(packaging.split(".")[0]) >= 26


@pytest.mark.slow
def test_verify_loads_no_server_module(venv: Path) -> None:
    """`import gateway.verify` in that install loads none of starlette, uvicorn, redis, limits, prometheus-client."""
    names = ",".join(sorted(SERVER_MODULES))
    code = (
        "import gateway.verify, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {names!r}.split(',')))"
    )
    # From the venv's directory, so `gateway` is the installed package and not this checkout.
    result = subprocess.run(
        offline([str(venv / "bin" / "python"), "-c", code]), capture_output=True, text=True, timeout=60, check=True,
        cwd=venv,
    )  # fmt: skip
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert "site-packages" in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=venv,
    ).stdout  # fmt: skip


@pytest.mark.slow
def test_server_install_leaves_out_the_testing_extra(venv: Path) -> None:
    """A plain install has no trustme (the test issuer's CA), and `gateway demo` says to install gateway[testing]."""
    python = str(venv / "bin" / "python")
    has_trustme = subprocess.run(
        [python, "-c", "import importlib.util; print(importlib.util.find_spec('trustme') is not None)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=venv,
    )  # fmt: skip
    assert has_trustme.stdout.strip() == "False"
    demo = subprocess.run(
        offline([python, "-m", "gateway", "demo"]), capture_output=True, text=True, timeout=60, check=False, cwd=venv
    )
    assert demo.returncode == 1
    assert "pip install 'gateway[testing]'" in demo.stderr and "Traceback" not in demo.stderr


def test_verify_loads_no_server_module_here() -> None:
    """In this checkout too, `import gateway.verify` alone loads no server module (fast, without a venv)."""
    code = (
        "import gateway.verify, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVER_MODULES)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=REPOSITORY
    )
    assert result.stdout.strip() == "[]"
