"""Pin on first use: a repository's ids are recorded at its first mint, and a re-created repository is refused.

The fleet tests run real `gateway serve` processes (two replicas sharing a real Redis; one gateway restarted on its
state file) and the real `python -m gateway pins` CLI; the rest drive apps over httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import config
from gateway.__main__ import main
from gateway.app import create_app
from gateway.state import FileState, RedisState, Revocation, pin_key
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config
from tests.processes import GatewayProcess, gateway_command, stop_all
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_fleet import acl_user

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

# The ids the test issuer's GitLab tokens carry (project_id, namespace_id), and a re-created project's.
REPOSITORY_ID, OWNER_ID = "61254376", "12885807"
RECREATED = {"project_id": "70000001", "job_project_id": "70000001"}
# The bound on how soon every replica sees a change made elsewhere.
HONOURED_WITHIN = 2.0


def pinning(issuer: TestIssuer) -> dict[str, Any]:
    return {"gitlab-com": gitlab_issuer(issuer, pin_on_first_use=True)}


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """The CLI configures logging for its process; called in-process, it must not keep this one's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_changed_repository_id_is_refused(make_gateway: Any, issuer: TestIssuer) -> None:
    """After a first mint, a token for the same path with another project id is refused invalid-publisher, saying
    the repository changed identity; the original ids still mint."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    refused = await gateway.mint(issuer.gitlab_token(**RECREATED))
    assert error_code(refused) == "invalid-publisher"
    text = description(refused)
    assert "changed identity since it was first seen" in text
    assert f"repository id was {REPOSITORY_ID!r}" in text and "owner id" not in text
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200


async def test_changed_owner_id_is_refused(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token whose owner (namespace) id differs from the pinned one is refused, naming the owner."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    refused = await gateway.mint(issuer.gitlab_token(namespace_id="555", job_namespace_id="555"))
    assert error_code(refused) == "invalid-publisher"
    assert "the owner of 'group/project'" in description(refused)


async def test_pins_hold_for_every_spelling_of_the_path(make_gateway: Any, issuer: TestIssuer) -> None:
    """The pin is keyed as matching folds paths: a re-created GROUP/Project is refused after group/project."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    refused = await gateway.mint(issuer.gitlab_token(project_path="GROUP/Project", **RECREATED))
    assert "changed identity" in description(refused)


async def test_pins_outlive_a_reload(make_gateway: Any, issuer: TestIssuer) -> None:
    """A config reload keeps the pins in force: the re-created repository is still refused after it."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert await gateway.app.state.reloader.reload()
    assert "changed identity" in description(await gateway.mint(issuer.gitlab_token(**RECREATED)))


async def test_a_reload_moving_the_state_file_is_refused(make_gateway: Any, issuer: TestIssuer) -> None:
    """state_file is restart-only: a reload naming another file is refused whole, so pins cannot be left behind."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    path = gateway.exchange.settings.config_path
    assert path is not None
    path.write_text(path.read_text().replace("[gateway]", '[gateway]\nstate_file = "elsewhere.json"', 1))
    assert not await gateway.app.state.reloader.reload()
    assert gateway.exchange.settings.state_file == path.parent / "gateway-state.json"


async def test_without_pin_on_first_use_ids_are_not_pinned(make_gateway: Any, issuer: TestIssuer) -> None:
    """An issuer without pin_on_first_use records nothing and mints for changed ids."""
    gateway: Gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert (await gateway.mint(issuer.gitlab_token(**RECREATED))).status_code == 200
    assert await gateway.exchange.state.pins() == []


async def test_refused_tokens_pin_nothing(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token that matches no publisher records no pin, so it cannot pin a repository for an attacker."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    assert (await gateway.mint(issuer.gitlab_token(workflow="evil.yml", **RECREATED))).status_code == 422
    assert await gateway.exchange.state.pins() == []
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200


async def test_mint_audit_lines_say_what_the_pin_did(
    make_gateway: Any, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """The first mint's audit line says its pin was recorded (with a pin line of its own), the next that it held,
    and a refusal that the ids changed."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    gateway: Gateway = await make_gateway(pinning(issuer))
    await gateway.mint(issuer.gitlab_token())
    await gateway.mint(issuer.gitlab_token())
    await gateway.mint(issuer.gitlab_token(**RECREATED))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [(line["event"], line.get("pin")) for line in lines] == [
        ("pin", None),
        ("mint", "recorded"),
        ("mint", "held"),
        ("mint", "changed"),
    ]
    assert (lines[0]["repository_id"], lines[0]["owner_id"]) == (REPOSITORY_ID, OWNER_ID)


@needs_redis
async def test_concurrent_first_mints_agree_on_one_pin(tmp_path: Path, issuer: TestIssuer) -> None:
    """Two replicas on one Redis racing to pin a repository with different ids: exactly one wins, on both."""
    with RedisServer() as redis_server:
        apps = []
        for n in range(2):
            directory = tmp_path / f"replica-{n}"
            directory.mkdir()
            path = write_config(directory, pinning(issuer), [PUBLISHER], redis_url=redis_server.url)
            apps.append(create_app(config.load(path)))
        clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://g.test") for app in apps]
        try:
            original, recreated = await asyncio.gather(
                clients[0].post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()}),
                clients[1].post("/_/oidc/mint-token", json={"token": issuer.gitlab_token(**RECREATED)}),
            )
            assert sorted([original.status_code, recreated.status_code]) == [200, 422]
            winner = RECREATED if recreated.status_code == 200 else {}
            loser = {} if winner else RECREATED
            for client in clients:
                answer = await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token(**winner)})
                assert answer.status_code == 200
                answer = await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token(**loser)})
                assert "changed identity" in description(answer)
        finally:
            for client, app in zip(clients, apps, strict=True):
                await client.aclose()
                await app.state.exchange.store.aclose()
                await app.state.exchange.keys.aclose()
                await app.state.upload.aclose()


@needs_redis
async def test_a_due_pin_that_cannot_be_recorded_fails_closed(make_gateway: Any, issuer: TestIssuer) -> None:
    """With Redis down, a mint whose pin is due is refused 503 replay-store-unavailable, even with the in-process
    replay fallback; a pin already held in the process keeps minting."""
    with RedisServer() as redis_server:
        gateway: Gateway = await make_gateway(
            pinning(issuer),
            [PUBLISHER, PUBLISHER | {"repository": "group/other"}],
            redis_url=redis_server.url,
            replay_fallback=True,
        )
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
        redis_server.stop()
        refused = await gateway.mint(issuer.gitlab_token(project_path="group/other"))
        assert refused.status_code == 503
        assert error_code(refused) == "replay-store-unavailable"
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200


async def test_pins_list_and_forget(make_gateway: Any, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]) -> None:
    """`pins list` shows a recorded pin; `pins forget` removes it, after which the re-created repository mints and
    is pinned in turn."""
    gateway: Gateway = await make_gateway(pinning(issuer))
    path = gateway.exchange.settings.config_path
    assert path is not None
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert await asyncio.to_thread(main, ["pins", "list", "--config", str(path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"issuer=gitlab-com repository=group/project repository_id={REPOSITORY_ID} ")
    forget = ["pins", "forget", "--config", str(path), "--issuer", "gitlab-com", "--repository", "Group/Project"]
    assert await asyncio.to_thread(main, forget) == 0
    state = gateway.exchange.state
    assert isinstance(state, FileState)
    state.invalidate()  # what the gateway does by itself within a second
    assert (await gateway.mint(issuer.gitlab_token(**RECREATED))).status_code == 200
    assert "changed identity" in description(await gateway.mint(issuer.gitlab_token()))
    assert await asyncio.to_thread(main, forget) == 0
    assert await asyncio.to_thread(main, forget) == 1
    assert "no pin is recorded" in capsys.readouterr().err


def test_pins_forget_needs_a_configured_issuer(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pins forget` naming an issuer the config does not have exits 1 and says so."""
    path = write_config(tmp_path, pinning(issuer), [PUBLISHER])
    assert main(["pins", "forget", "--config", str(path), "--issuer", "nope", "--repository", "a/b"]) == 1
    assert "names no issuer" in capsys.readouterr().err


def test_pin_keys_name_the_issuer_url_and_the_folded_path() -> None:
    """A pin's key depends on the issuer's URL and the ASCII-folded path only."""
    assert pin_key("https://gitlab.com", "Group/Project") == pin_key("https://gitlab.com", "group/project")
    assert pin_key("https://gitlab.com", "group/project") != pin_key("https://gitlab.example", "group/project")


# Real processes.


def mint(base: str, token: str) -> httpx.Response:
    return httpx.post(f"{base}/_/oidc/mint-token", json={"token": token}, timeout=10)


def wait_for(base: str, issuer: TestIssuer, claims: dict[str, str], want: int, since: float) -> None:
    """Mint tokens with `claims` at `base` until one answers `want`, within HONOURED_WITHIN s after `since`."""
    while True:
        response = mint(base, issuer.gitlab_token(**claims))
        if response.status_code == want:
            return
        assert time.monotonic() - since < HONOURED_WITHIN, f"{base}: {response.status_code} {response.text}"
        time.sleep(0.05)


@needs_redis
def test_pin_made_by_one_replica_is_honoured_by_another(tmp_path: Path, issuer: TestIssuer) -> None:
    """Two `gateway serve` replicas on one Redis: the second refuses the changed id the first pinned; after `pins
    forget` with the CLI, the re-created repository mints on the second and the first then refuses the old ids."""
    with RedisServer() as redis_server:
        path = write_config(tmp_path, pinning(issuer), [PUBLISHER], redis_url=redis_server.url)
        replicas = [GatewayProcess(path) for _ in range(2)]
        try:
            first, second = (replica.wait("/readyz").base for replica in replicas)
            assert mint(first, issuer.gitlab_token()).status_code == 200
            refused = mint(second, issuer.gitlab_token(**RECREATED))
            assert error_code(refused) == "invalid-publisher"
            assert "changed identity since it was first seen" in description(refused)
            with redis_server.client() as inspect:
                assert inspect.exists("gateway:" + pin_key(issuer.url, "group/project"))

            listed = gateway_command(path, "pins", "list")
            assert listed.returncode == 0 and "repository=group/project" in listed.stdout, listed.stderr
            forgot = gateway_command(path, "pins", "forget", "--issuer", "gitlab-com", "--repository", "group/project")
            finished = time.monotonic()
            assert forgot.returncode == 0, forgot.stderr
            wait_for(second, issuer, RECREATED, 200, finished)
            wait_for(first, issuer, {}, 422, finished)
        finally:
            stop_all(replicas)


def test_pin_survives_a_restart_in_the_state_file(tmp_path: Path, issuer: TestIssuer) -> None:
    """Without Redis, a pin recorded by a `gateway serve` process is in the state file and refuses the changed id
    after a restart."""
    path = write_config(tmp_path, pinning(issuer), [PUBLISHER])
    with GatewayProcess(path) as gateway:
        assert mint(gateway.wait().base, issuer.gitlab_token()).status_code == 200
    document = json.loads((tmp_path / "gateway-state.json").read_text())
    (pin,) = document["pins"].values()
    assert (pin["repository_id"], pin["owner_id"]) == (REPOSITORY_ID, OWNER_ID)
    with GatewayProcess(path) as gateway:
        refused = mint(gateway.wait().base, issuer.gitlab_token(**RECREATED))
        assert "changed identity since it was first seen" in description(refused)
        assert mint(gateway.base, issuer.gitlab_token()).status_code == 200


@needs_redis
async def test_redis_state_keys_live_under_the_prefix(tmp_path: Path, issuer: TestIssuer) -> None:
    """Pins and revocations are written under the store's prefix, one key per pin and one hash of revocations."""
    with RedisServer() as redis_server:
        path = write_config(tmp_path, pinning(issuer), [PUBLISHER], redis_url=redis_server.url)
        app = create_app(config.load(path))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://g.test")
        try:
            state = app.state.exchange.state
            assert isinstance(state, RedisState)
            assert (await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})).status_code == 200
            revoke = ["revoke", "--config", str(path), "--issuer", "gitlab-com", "--repository", "a/b", "--reason", "x"]
            assert await asyncio.to_thread(main, revoke) == 0
            with redis_server.client() as inspect:
                names = {name.decode() for name in inspect.scan_iter("*")}
            assert {"gateway:" + pin_key(issuer.url, "group/project"), "gateway:revocations"} <= names
            assert all(name.startswith("gateway:") for name in names)
        finally:
            await client.aclose()
            await app.state.exchange.store.aclose()
            await app.state.exchange.keys.aclose()
            await app.state.upload.aclose()


@needs_redis
async def test_pins_and_revocations_work_under_the_documented_acl_user(make_gateway: Any, issuer: TestIssuer) -> None:
    """Under a Redis user allowed only its prefix and the commands README's ACL line lists, a gateway pins,
    refuses a changed id, honours a revocation and its lifting, and forgets a pin, without a Redis error."""
    with RedisServer() as redis_server:
        url = acl_user(redis_server, "deploy", "staging:")
        gateway: Gateway = await make_gateway(pinning(issuer), redis_url=url, redis_prefix="staging:")
        state = gateway.exchange.state
        assert isinstance(state, RedisState)
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
        assert "changed identity" in description(await gateway.mint(issuer.gitlab_token(**RECREATED)))
        revocation = Revocation(id="r1", issuer_url=issuer.url, repository="group/project", reason="incident")
        await state.revoke(revocation)
        assert "incident" in description(await gateway.mint(issuer.gitlab_token()))
        assert await state.lift("r1") == revocation
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
        assert await state.forget(issuer.url, "group/project") is not None
        assert (await gateway.mint(issuer.gitlab_token(**RECREATED))).status_code == 200
        with redis_server.client() as inspect:
            names = [key.decode() for key in inspect.scan_iter(match="*")]
        assert all(name.startswith("staging:") for name in names), names
