"""The `gateway` command line, run as real subprocesses: check, keygen and serve."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, import_key

from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.processes import GatewayProcess, free_port, gateway_environ

REPOSITORY = Path(__file__).resolve().parent.parent


def gateway_cli(*args: str, cwd: Path, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=gateway_environ() if environ is None else environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def good_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, {"gitlab-com": {"url": "https://gitlab.com", "kind": "gitlab"}}, [PUBLISHER])


def bad_config(directory: Path) -> Path:
    """A config with exactly three problems: an unknown [gateway] key, an http issuer, an unknown publisher issuer."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        {"gitlab-com": {"url": "http://gitlab.com", "kind": "gitlab"}},
        [PUBLISHER | {"issuer": "nowhere"}],
        colour="blue",
    )


BAD_LINES = [
    "issuers.toml: [gateway] colour: unknown key",
    "issuers.toml: [issuers.gitlab-com] url: must be an https URL with no query or fragment (got 'http://gitlab.com')",
    "publishers.toml: [[publisher]] #1 issuer: names no issuer in [issuers] (got 'nowhere')",
]


# --- check -------------------------------------------------------------------------------------------------------


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    """`gateway check` exits 0 on a valid config and summarizes what it loaded."""
    result = gateway_cli("check", "--config", str(good_config(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 1 issuer(s) (gitlab-com), 1 publisher(s)"


def test_check_accepts_the_repository_config(tmp_path: Path) -> None:
    """`gateway check` exits 0 on the repository's own issuers.toml."""
    result = gateway_cli("check", "--config", str(REPOSITORY / "issuers.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(gitlab-com)" in result.stdout


def test_check_reports_one_line_per_problem(tmp_path: Path) -> None:
    """`gateway check` exits 1 on a bad config and prints one line per problem naming file, table and field."""
    result = gateway_cli("check", "--config", str(bad_config(tmp_path)), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == BAD_LINES
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("option", "variable", "in_cwd", "returncode"),
    [
        pytest.param("good", "bad", "bad", 0, id="option-beats-variable"),
        pytest.param("bad", "good", "good", 1, id="bad-option-beats-good-variable"),
        pytest.param(None, "good", "bad", 0, id="variable-beats-cwd"),
        pytest.param(None, "bad", "good", 1, id="bad-variable-beats-good-cwd"),
        pytest.param(None, None, "good", 0, id="cwd-default"),
        pytest.param(None, None, None, 1, id="nothing-found"),
    ],
)
def test_check_config_path_precedence(
    tmp_path: Path, option: str | None, variable: str | None, in_cwd: str | None, returncode: int
) -> None:
    """The config is --config, else $GATEWAY_CONFIG, else ./issuers.toml."""
    paths = {"good": good_config(tmp_path / "good"), "bad": bad_config(tmp_path / "bad")}
    cwd = tmp_path / in_cwd if in_cwd else tmp_path / "empty"
    cwd.mkdir(exist_ok=True)
    args = ["check"] + (["--config", str(paths[option])] if option else [])
    # The runner's own GATEWAY_* variables must not leak into what a test asserts about precedence.
    environ = gateway_environ(GATEWAY_CONFIG=str(paths[variable])) if variable else gateway_environ()
    result = gateway_cli(*args, cwd=cwd, environ=environ)
    assert result.returncode == returncode, result.stderr
    if in_cwd is None:
        assert result.stderr.startswith("issuers.toml: file: not found"), result.stderr


# --- keygen ------------------------------------------------------------------------------------------------------


def keygen(tmp_path: Path, *extra: str, name: str = "signing-key.json") -> tuple[Path, dict[str, Any]]:
    out = tmp_path / name
    result = gateway_cli("keygen", "--out", str(out), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("extra", "kty", "crv"),
    [
        pytest.param((), "EC", "P-256", id="default-es256"),
        pytest.param(("--alg", "Ed25519"), "OKP", "Ed25519", id="ed25519"),
    ],
)
def test_keygen_writes_private_jwk_with_mode_0600(tmp_path: Path, extra: tuple[str, ...], kty: str, crv: str) -> None:
    """`gateway keygen --out` writes a private JWK of the chosen curve, mode 0600, with kid = RFC 7638 thumbprint."""
    out, document = keygen(tmp_path, *extra)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (document["kty"], document["crv"]) == (kty, crv)
    assert "d" in document
    key = import_key(document)
    assert key.is_private
    assert document["kid"] == key.thumbprint()


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    """`gateway keygen --out` exits 1 and leaves the file alone when it already exists."""
    out = tmp_path / "signing-key.json"
    out.write_text("the key in use\n")
    result = gateway_cli("keygen", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1
    assert "refusing to overwrite" in result.stderr
    assert out.read_text() == "the key in use\n"


def test_keygen_into_a_missing_directory_is_one_line_without_traceback(tmp_path: Path) -> None:
    """`gateway keygen --out` into a directory that does not exist exits 1 with one line naming the path."""
    out = tmp_path / "nonexistent" / "dir" / "key.json"
    result = gateway_cli("keygen", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{out}: No such file or directory"]
    assert "Traceback" not in result.stderr
    assert not out.parent.exists()


def test_keygen_without_out_prints_the_jwk(tmp_path: Path) -> None:
    """`gateway keygen` with no --out prints the private JWK on standard output and writes no file."""
    result = gateway_cli("keygen", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["kty"], document["crv"], document["kid"]) == ("EC", "P-256", import_key(document).thumbprint())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [pytest.param((), id="es256"), pytest.param(("--alg", "Ed25519"), id="ed25519")])
async def test_keygen_key_works_as_signing_key(
    tmp_path: Path, make_gateway: Any, issuer: TestIssuer, extra: tuple[str, ...]
) -> None:
    """A `gateway keygen` key works as signing_key: the JWKS publishes its kid and minted tokens verify with it."""
    out, document = keygen(tmp_path, *extra)
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, signing_key=str(out))
    jwks = (await gateway.client.get("/.well-known/jwks.json")).json()
    assert [key["kid"] for key in jwks["keys"]] == [document["kid"]]
    assert "d" not in jwks["keys"][0]
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 200, response.text
    algorithm = "ES256" if document["kty"] == "EC" else "Ed25519"
    decoded = jwt.decode(response.json()["token"], import_key(document), algorithms=[algorithm])
    assert decoded.header["kid"] == document["kid"]


# --- serve -------------------------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, issuer: TestIssuer) -> Iterator[GatewayProcess]:
    """`gateway serve` as a real uvicorn process trusting the test issuer, answering /livez; its log in serve.log."""
    port = free_port()
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], url=f"http://127.0.0.1:{port}")
    with GatewayProcess(path, port=port, log=tmp_path / "serve.log", cwd=tmp_path).wait() as server:
        yield server


def test_serve_mints_over_a_real_socket_and_stops_on_sigterm(served: GatewayProcess, issuer: TestIssuer) -> None:
    """`gateway serve` mints a token for a real ID token over TCP, verifiable with its JWKS, and exits 0 on SIGTERM."""
    process, base, log = served.process, served.base, served.log
    with httpx.Client(base_url=base, timeout=10) as client:
        response = client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True
        assert body["projects"] == ["sampleproject"]
        discovery = client.get("/.well-known/openid-configuration").json()
        assert discovery["jwks_uri"] == f"{base}/.well-known/jwks.json"
        jwks = KeySet.import_key_set(client.get("/.well-known/jwks.json").json())
    decoded = jwt.decode(body["token"], jwks, algorithms=["ES256"])
    assert decoded.claims["iss"] == base
    assert decoded.claims["aud"] == "pypi"
    assert decoded.claims["sub"] == "gitlab-com:group/project"
    assert decoded.claims["projects"] == ["sampleproject"]
    assert decoded.claims["exp"] == body["expires"]
    assert decoded.claims["identity"]["issuer_url"] == issuer.url

    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway serve ignored SIGTERM:\n{log.read_text()}")
    output = log.read_text()
    assert "Application shutdown complete" in output, output
    # A supervisor reads a nonzero status (or death by signal) as a crash, so a clean stop must exit 0.
    assert returncode == 0, f"exit status {returncode} after a graceful shutdown"


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    """`gateway serve` with a bad config prints every problem, exits 1 and never starts a server."""
    port = free_port()
    result = gateway_cli("serve", "--config", str(bad_config(tmp_path)), "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == BAD_LINES
    assert "Uvicorn running" not in result.stdout + result.stderr


# --- several workers need shared state ---------------------------------------------------------------------------


def fleet_config(directory: Path, **gateway: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory, {"gitlab-com": {"url": "https://gitlab.com", "kind": "gitlab"}}, [PUBLISHER], **gateway
    )


def signing_key_file(directory: Path) -> str:
    result = gateway_cli("keygen", "--out", str(directory / "signing.jwk"), cwd=directory)
    assert result.returncode == 0, result.stderr
    return str(directory / "signing.jwk")


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        ("redis_url", "[gateway] redis_url: --workers 2 needs a shared Redis"),
        ("signing_key", "[gateway] signing_key: --workers 2 needs one signing key for all workers"),
    ],
)
def test_serve_with_workers_refuses_a_config_without_shared_state(tmp_path: Path, missing: str, reason: str) -> None:
    """`gateway serve --workers 2` without redis_url or signing_key exits 2 with one line saying why and what to set."""
    settings = {"redis_url": "redis://127.0.0.1:1/0", "signing_key": signing_key_file(tmp_path)} | {missing: None}
    config = fleet_config(tmp_path / "config", **settings)
    port = free_port()
    result = gateway_cli("serve", "--config", str(config), "--port", str(port), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert reason in line
    assert f"set {missing}" in line
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_serve_with_workers_names_both_missing_settings_on_one_line(tmp_path: Path) -> None:
    """Without redis_url and signing_key, `gateway serve --workers 3` names both, on one line, and exits 2."""
    config = fleet_config(tmp_path)
    result = gateway_cli("serve", "--config", str(config), "--port", str(free_port()), "--workers", "3", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "set redis_url" in line and "set signing_key" in line


def test_check_with_workers_reports_each_missing_setting(tmp_path: Path) -> None:
    """`gateway check --workers 2` exits 1 with one line per missing setting; without --workers the config is fine."""
    config = fleet_config(tmp_path)
    assert gateway_cli("check", "--config", str(config), cwd=tmp_path).returncode == 0
    result = gateway_cli("check", "--config", str(config), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["[gateway] redis_url", "[gateway] signing_key"]
    assert all(line.startswith("issuers.toml: [gateway] ") for line in lines)


def test_check_with_workers_accepts_a_config_with_shared_state(tmp_path: Path) -> None:
    """`gateway check --workers 4` exits 0 for a config with redis_url and signing_key (Redis is not contacted)."""
    config = fleet_config(
        tmp_path / "config", redis_url="redis://127.0.0.1:1/0", signing_key=signing_key_file(tmp_path)
    )
    result = gateway_cli("check", "--config", str(config), "--workers", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_below_one_is_a_usage_error(tmp_path: Path, command: str, workers: str) -> None:
    """`--workers` below 1 (or not a number) is a usage error: exit 2, and nothing is served."""
    result = gateway_cli(command, "--config", str(fleet_config(tmp_path)), "--workers", workers, cwd=tmp_path)
    assert result.returncode == 2
    assert "--workers" in result.stderr
