"""What an operator meets before the gateway serves: flags, --help texts, the README command table, startup line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.__main__ import main, redacted, startup_line
from gateway.mint import generate_key
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.processes import GatewayProcess, free_port, gateway_environ

REPOSITORY = Path(__file__).resolve().parent.parent


def help_text(*command: str) -> str:
    """`gateway COMMAND --help` as a subprocess prints it (wide, so no option wraps across lines)."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--help"],
        capture_output=True,
        text=True,
        env=gateway_environ(COLUMNS="500"),
        timeout=60,
        check=True,
    )
    return result.stdout


def commands() -> list[str]:
    """Every command `gateway --help` lists."""
    found = re.search(r"\{([a-z,-]+)\}", help_text())
    assert found is not None
    return found[1].split(",")


def options(command: str) -> list[str]:
    """The flags and positional arguments of one command, as its --help lists them (without -h/--help)."""
    text = help_text(command)
    usage = text.split("\n\n", 1)[0]
    flags = sorted(set(re.findall(r"(--[a-z][a-z-]*)", usage)) - {"--help"})
    positionals = [word for word in re.findall(r"(?<![\[\w-])([A-Z][A-Z_|-]*)(?![\w\]])", usage)]
    return flags + [p for p in positionals if not any(p in flag.upper() for flag in flags)]


def test_every_command_has_a_description() -> None:
    """Each command's --help has a paragraph between its usage and its options, not just the usage line."""
    for command in commands():
        text = help_text(command)
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        assert len(paragraphs) >= 3, f"gateway {command} --help has no description:\n{text}"
        assert not paragraphs[1].lstrip().startswith(("positional arguments:", "options:")), text


def test_readme_command_table_lists_every_option() -> None:
    """The README's command table has a row for every command, naming each of its options and arguments."""
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("## Commands", 1)[1].split("\n\n", 2)[1]
    rows = {
        found[1]: line
        for line in section.splitlines()
        if (found := re.match(r"\| `gateway ([a-z-]+)", line)) is not None
    }
    assert sorted(rows) == sorted(commands())
    for command in commands():
        for option in options(command):
            assert option in rows[command], f"README's row for `gateway {command}` lacks {option}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "0"], "argument --port: must be between 1 and 65535 (got 0)"),
        (["serve", "--port", "65536"], "argument --port: must be between 1 and 65535 (got 65536)"),
        (["serve", "--port", "http"], "argument --port: must be a whole number (got 'http')"),
        (["serve", "--workers", "0"], "argument --workers: must be at least 1 (got 0)"),
        (["serve", "--workers", "-2"], "argument --workers: must be at least 1 (got -2)"),
    ],
)
def test_bad_port_or_workers_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--port outside 1-65535 and --workers below 1 exit 2 with the reason, like any bad flag, before any config."""
    with pytest.raises(SystemExit) as exited:
        main([*args, "--config", "/nonexistent/issuers.toml"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://gateway:s3cret@redis:6380/0", "rediss://gateway:***@redis:6380/0"),
        ("redis://user:p@ss@redis/0", "redis://user:***@redis/0"),
        ("redis://s3cret@redis/0", "redis://***@redis/0"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
        ("redis+sentinel://:s3cret@a:26379,b:26379/main", "redis+sentinel://:***@a:26379,b:26379/main"),
    ],
)
def test_redacted(url: str, shown: str) -> None:
    """A URL in the log shows everything but its password."""
    assert redacted(url) == shown


def test_startup_line_names_what_serves(tmp_path: Path, issuer: TestIssuer) -> None:
    """The startup line names each issuer and its URL, the publishers, the store, the upstream, the key id and the
    workers, and no password."""
    key = generate_key()
    (tmp_path / "key.json").write_text(json.dumps(key.as_dict(private=True)))
    path = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        [PUBLISHER],
        signing_key="key.json",
        redis_url="redis://:s3cret@127.0.0.1:6379/0",
    )
    path.write_text(
        path.read_text()
        + '\n[upstream]\nurl = "http://127.0.0.1:1/legacy/"\nusername = "operator"\npassword_env = "UPSTREAM"\n'
    )
    line = startup_line(config.load(path, {"UPSTREAM": "hunter2"}), 2)
    assert line.startswith("gateway ") and "starting: " in line
    assert f"issuers gitlab-com ({issuer.url}); 1 publisher(s); " in line
    assert "store redis://:***@127.0.0.1:6379/0; upstream http://127.0.0.1:1/legacy/ as 'operator'; " in line
    assert line.endswith(f"signing key kid {key.thumbprint()}; 2 worker(s)")
    assert "s3cret" not in line and "hunter2" not in line


def test_serve_logs_the_startup_line_once(tmp_path: Path, issuer: TestIssuer) -> None:
    """`gateway serve` logs the startup line once, with an in-process store and an ephemeral key said as such."""
    port = free_port()
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], url=f"http://127.0.0.1:{port}")
    with GatewayProcess(path, port=port, log=tmp_path / "serve.log").wait() as server:
        pass
    lines = [line for line in server.log.read_text().splitlines() if " starting: issuers " in line]
    assert len(lines) == 1, server.log.read_text()
    assert "store in-process (no redis_url); upstream none; signing key ephemeral (no signing_key); 1 worker(s)" in (
        lines[0]
    )
