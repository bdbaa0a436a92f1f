"""Issuers the gateway cannot reach: `gateway probe-issuer --write-jwks` and `[issuers.X] jwks_file`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import config
from gateway.__main__ import main
from gateway.errors import ConfigError
from gateway.probe import write_jwks
from gateway.testing import TestIssuer, oct_jwk, weak_rsa_jwk
from tests.conftest import PUBLISHER, description, error_code, write_config
from tests.processes import GatewayProcess
from tests.redis_server import REDIS_SERVER, RedisServer

# --- probe-issuer --write-jwks ----------------------------------------------------------------------------------


def test_write_jwks_snapshots_the_usable_keys(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--write-jwks writes exactly the published keys that pass the key rules, as published, and says which."""
    issuer.extra_jwks = [weak_rsa_jwk(1024, kid="weak"), oct_jwk(kid="shared-secret")]
    target = tmp_path / "keys" / "gitlab.jwks.json"
    target.parent.mkdir()
    code = main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)])
    out = capsys.readouterr().out
    # The weak and symmetric keys fail the "every published key is usable" rule; the usable one is still written.
    assert code == 1, out
    written = json.loads(target.read_text())
    assert [key["kid"] for key in written["keys"]] == [issuer.signing_kid]
    assert written["keys"][0] == issuer.jwks()["keys"][0]
    assert f"wrote 1 key(s) ('{issuer.signing_kid}') to {target}" in out
    # Written through a temporary file that was renamed into place: nothing else is left in the directory.
    assert [p.name for p in target.parent.iterdir()] == ["gitlab.jwks.json"]


def test_write_jwks_replaces_an_existing_file(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing snapshot is replaced whole by the new one (the gateway watching it reloads the new keys)."""
    target = tmp_path / "jwks.json"
    target.write_text('{"keys": []}')
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)]) == 0
    assert [key["kid"] for key in json.loads(target.read_text())["keys"]] == issuer.published_kids


def test_write_jwks_writes_nothing_without_a_usable_key(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An issuer with no usable key gets no file, and the command exits 1 saying so."""
    issuer.jwks_override = {"keys": [weak_rsa_jwk(1024, kid="weak")]}
    target = tmp_path / "jwks.json"
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)]) == 1
    assert "not written: the issuer has no usable key" in capsys.readouterr().err
    assert not target.exists()


# --- [issuers.X] jwks_file --------------------------------------------------------------------------------------


def snapshot(issuer: TestIssuer, path: Path, *extra: dict[str, Any]) -> Path:
    """The issuer's published keys (plus `extra`) written as an operator's jwks_file."""
    write_jwks(path, (*issuer.jwks()["keys"], *extra))
    return path


def static_issuer(issuer: TestIssuer, jwks_file: str = "issuer.jwks.json", **extra: Any) -> dict[str, Any]:
    # No ca_bundle: nothing is ever fetched from this issuer.
    return {"url": issuer.url, "kind": "gitlab", "jwks_file": jwks_file} | extra


def test_jwks_file_loads_and_is_watched(tmp_path: Path, issuer: TestIssuer) -> None:
    """A jwks_file is read at load, relative to issuers.toml, and is among the files the reloader watches."""
    snapshot(issuer, tmp_path / "issuer.jwks.json")
    settings = config.load(write_config(tmp_path, {"gitlab-com": static_issuer(issuer)}, [PUBLISHER]))
    loaded = settings.issuers["gitlab-com"]
    assert loaded.jwks_file == tmp_path / "issuer.jwks.json"
    assert loaded.jwks_file in settings.files


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(None, "cannot be read", id="missing"),
        pytest.param("{not json", "is not JSON", id="not-json"),
        pytest.param('{"kty": "RSA"}', "not an object with a 'keys' list", id="not-a-jwks"),
        pytest.param('{"keys": []}', "has no usable key; write it with `gateway probe-issuer", id="empty"),
        pytest.param(
            json.dumps({"keys": [weak_rsa_jwk(1024, kid="weak"), oct_jwk(kid="secret")]}),
            "has no usable key (key 'weak': RSA key of 1024 bits is weaker than 2048; key 'secret': symmetric",
            id="only-unusable-keys",
        ),
    ],
)
def test_jwks_file_without_a_usable_key_is_a_config_error(
    tmp_path: Path, issuer: TestIssuer, content: str | None, fragment: str
) -> None:
    """A jwks_file that is missing, not a JWKS, or holds no key passing the key rules is a load error naming it."""
    if content is not None:
        (tmp_path / "issuer.jwks.json").write_text(content)
    with pytest.raises(ConfigError) as raised:
        config.load(write_config(tmp_path, {"gitlab-com": static_issuer(issuer)}, [PUBLISHER]), environ={})
    [problem] = raised.value.problems
    assert problem.startswith("issuers.toml: [issuers.gitlab-com] jwks_file: ")
    assert fragment in problem


async def test_jwks_file_issuer_mints_with_no_network_io(
    tmp_path: Path, make_gateway: Any, issuer: TestIssuer
) -> None:
    """Tokens of a jwks_file issuer verify with the file's keys; neither they nor an unknown kid cause any request."""
    snapshot(issuer, tmp_path / "issuer.jwks.json", weak_rsa_jwk(1024, kid="weak"))
    gateway = await make_gateway({"gitlab-com": static_issuer(issuer, str(tmp_path / "issuer.jwks.json"))})
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    stranger = issuer.add_key(publish=False)
    response = await gateway.mint(issuer.gitlab_token(kid=stranger))
    assert error_code(response) == "invalid-token"
    assert f"has no key {stranger!r} in its jwks_file" in description(response)
    # Nothing to refresh, so no cooldown either: the same unknown kid is refused the same way again, at once.
    assert error_code(await gateway.mint(issuer.gitlab_token(kid=stranger))) == "invalid-token"
    assert issuer.requests == []


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_jwks_file_keys_never_touch_the_shared_key_sets(
    tmp_path: Path, make_gateway: Any, issuer: TestIssuer
) -> None:
    """With Redis, a jwks_file issuer's keys are neither read from nor written to the shared key sets: only the
    spent jti is stored."""
    snapshot(issuer, tmp_path / "issuer.jwks.json")
    with RedisServer() as redis_server:
        gateway = await make_gateway(
            {"gitlab-com": static_issuer(issuer, str(tmp_path / "issuer.jwks.json"))}, redis_url=redis_server.url
        )
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
        stored = sorted(key.decode() for key in redis_server.client().keys("*"))  # type: ignore[union-attr]
        await gateway.exchange.store.aclose()
    assert [key.split(":")[1] for key in stored] == ["jti"], stored
    assert issuer.requests == []


def test_jwks_file_issuer_in_a_real_gateway_survives_its_server_and_reloads(tmp_path: Path, ca: Any) -> None:
    """A `gateway serve` process trusts an issuer whose server is gone from a jwks_file written by probe-issuer:
    its tokens mint, an unknown kid is invalid-token, and a rewritten file's new key works without a restart."""
    jwks = tmp_path / "private.jwks.json"
    with TestIssuer(ca=ca) as private:
        url = private.url
        assert main(["probe-issuer", url, "--ca-bundle", str(private.ca_path), "--write-jwks", str(jwks)]) == 0
        good = private.gitlab_token()
        stranger = private.gitlab_token(kid=private.add_key(publish=False))
        rotated_kid = private.add_key(publish=False)
        rotated = private.gitlab_token(kid=rotated_kid)
        rotated_jwk = dict(private.private_key(rotated_kid).as_dict(private=False))
    # The issuer's TLS server is stopped: any request the gateway made for its keys would fail (503).
    path = write_config(
        tmp_path,
        {"private": {"url": url, "kind": "gitlab", "jwks_file": jwks.name}},
        [PUBLISHER | {"issuer": "private"}],
        reload_interval=0.2,
    )
    with GatewayProcess(path).wait() as server, httpx.Client(base_url=server.base, timeout=10) as client:

        def mint(token: str) -> httpx.Response:
            return client.post("/_/oidc/mint-token", json={"token": token})

        assert mint(good).status_code == 200, server.tail()
        refused = mint(stranger)
        assert error_code(refused) == "invalid-token", refused.text
        assert "in its jwks_file" in description(refused)
        assert error_code(mint(rotated)) == "invalid-token"
        write_jwks(jwks, (*json.loads(jwks.read_text())["keys"], rotated_jwk))
        deadline = time.monotonic() + 15
        while (response := mint(rotated)).status_code != 200 and time.monotonic() < deadline:
            # Refused tokens are not spent, so the same token is retried until the reload has happened.
            assert error_code(response) == "invalid-token", response.text
            time.sleep(0.1)
        assert response.status_code == 200, server.tail()
