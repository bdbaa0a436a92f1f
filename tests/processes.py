"""Real server processes for end-to-end tests: `gateway serve`, nginx, or any other HTTP server on loopback.

Not a test module (like tests/redis_server.py): the test files that run the gateway as an operator would (a real
process, behind a real nginx) build their fixtures on these. Every server writes its output to a log file, is waited
for over HTTP with a deadline (a server that exits or does not answer in time is stopped, and the error carries the
tail of its log), and is stopped with SIGTERM and a bounded wait, killed if it outstays it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, Self

import httpx

from gateway.testing import free_port

__all__ = [
    "NGINX",
    "STARTUP",
    "STOP",
    "GatewayProcess",
    "Nginx",
    "Server",
    "StartupError",
    "free_port",
    "gateway_environ",
    "nginx_proxy_conf",
    "stop_all",
]

NGINX = shutil.which("nginx")
# Seconds a server gets to answer after it was started (a cold `gateway serve` needs about one).
STARTUP = 30.0
# Seconds a server gets to exit after SIGTERM before it is killed.
STOP = 10.0
TAIL = 3000


class StartupError(RuntimeError):
    """A server exited, or did not answer, before it was ready."""


def gateway_environ(**extra: str) -> dict[str, str]:
    """This process's environment without GATEWAY_* and PROMETHEUS_* variables, plus `extra`.

    The config file a test writes is the whole truth, not whatever the environment running the tests has set.
    """
    kept = {name: value for name, value in os.environ.items() if not name.startswith(("GATEWAY_", "PROMETHEUS_"))}
    return kept | extra


def gateway_command(config: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS --config CONFIG` as an operator runs it, in a process of its own (environment:
    gateway_environ(**environ))."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        env=gateway_environ(**environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Server:
    """One server process listening on 127.0.0.1:`port`, started at construction.

    Its stderr (and stdout, unless `stdout` names a file of its own) is appended to `log`, so a server restarted
    on the same port keeps one log of both lives.
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Path | None = None,
    ) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.stdout = stdout or log
        log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            err = files.enter_context(log.open("ab"))
            out = files.enter_context(stdout.open("ab")) if stdout else err
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                list(command), stdout=out, stderr=err, env=None if env is None else dict(env), cwd=cwd
            )

    def tail(self) -> str:
        """The end of the log, for a failure message."""
        return self.log.read_text(errors="replace")[-TAIL:] if self.log.exists() else ""

    def wait(self, path: str = "/livez", timeout: float = STARTUP) -> Self:
        """Return once GET `path` answers 200; if the process exits or `timeout` passes first, stop it and raise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self._fail(f"{self.base}: exited with {self.process.returncode} before {path} answered 200")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + path, timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self._fail(f"{self.base}{path} did not answer 200 within {timeout:g} s")
            # Waiting for another process to bind its socket and warm up: there is no clock to advance here.
            time.sleep(0.05)

    def _fail(self, message: str) -> NoReturn:
        self.stop()
        raise StartupError(f"{message}:\n{self.tail()}")

    def terminate(self) -> None:
        """Send SIGTERM if the process is still running; do not wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP) -> int:
        """SIGTERM, then wait up to `timeout` seconds, then SIGKILL; the exit status (negative: killed by a signal)."""
        self.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stop_all(servers: Iterable[Server], timeout: float = STOP) -> None:
    """Stop every server: SIGTERM to all at once (each may drain for drain_seconds), then wait for each in turn."""
    servers = list(servers)
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop(timeout)


class GatewayProcess(Server):
    """`python -m gateway serve --config CONFIG --port PORT [--workers N] [ARGS]`, as an operator runs it.

    `port` defaults to a free one (pass one chosen beforehand when the config must name the gateway's own URL);
    `env` is the whole environment, by default `gateway_environ()`; `log` defaults to CONFIG's directory/
    gateway-PORT.log. Started at construction: call `wait()` (`/livez`, or `/readyz` to wait for Redis too).
    """

    def __init__(
        self,
        config: Path,
        *,
        port: int | None = None,
        workers: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        port = port or free_port()
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
        if workers is not None:
            command += ["--workers", str(workers)]
        super().__init__(
            [*command, *args],
            port,
            log or config.parent / f"gateway-{port}.log",
            env=gateway_environ() if env is None else env,
            cwd=cwd,
        )


class Nginx(Server):
    """A real nginx in the foreground (`-g 'daemon off;'`) with `directory` as its prefix, on 127.0.0.1:`port`.

    `conf(directory, port)` is the config's text; it must keep pid, logs and temp files inside `directory` and
    must not set `daemon`. It is written to directory/nginx.conf, with `user root;` in front when the tests run
    as root: nginx would otherwise hand its workers to `nobody`, who cannot enter pytest's private tmp directory.
    nginx's stdout (an `access_log /dev/stdout`) goes to directory/stdout.log, its stderr to directory/stderr.log.
    Started at construction: call `wait()`, which by default waits for `/livez` through nginx to a gateway.
    """

    def __init__(self, directory: Path, conf: Callable[[Path, int], str], *, port: int | None = None) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
        port = port or free_port()
        self.directory = directory
        self.conf = directory / "nginx.conf"
        directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(("user root;\n" if os.geteuid() == 0 else "") + conf(directory, port))
        super().__init__(
            self.command("-g", "daemon off;"), port, directory / "stderr.log", stdout=directory / "stdout.log"
        )

    def command(self, *extra: str) -> list[str]:
        """nginx with this config and prefix (and its startup errors in directory/error.log), plus `extra`."""
        assert NGINX is not None
        prefix = self.directory
        return [NGINX, "-c", str(self.conf), "-p", str(prefix), "-e", str(prefix / "error.log"), *extra]

    def tail(self) -> str:
        error_log = self.directory / "error.log"
        errors = error_log.read_text(errors="replace")[-TAIL:] if error_log.exists() else ""
        return f"{super().tail()}\n--- error.log ---\n{errors}"


def nginx_proxy_conf(directory: Path, port: int, upstreams: Sequence[int], *, location: Sequence[str] = ()) -> str:
    """An nginx.conf for `Nginx`: one worker, round robin over the gateways on `upstreams`, listening on `port`.

    `location` adds directives (or comments) to the one `location /` block.
    """
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    extra = "".join(f"            {line}\n" for line in location)
    return f"""worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
{temp}
    upstream gateway {{
        # Round robin, the default: consecutive requests go to consecutive replicas.
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{extra}        }}
    }}
}}
"""
