from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import config
from gateway.app import create_app
from gateway.mint import generate_key
from gateway.reload import Reloader
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config
from tests.processes import GatewayProcess, free_port

RELEASE = PUBLISHER | {"repository": "group/release", "projects": ["release-project"]}


def directory_of(gateway: Gateway) -> Path:
    path = gateway.exchange.settings.config_path
    assert path is not None
    return path.parent


def reloader(gateway: Gateway) -> Reloader:
    return gateway.app.state.reloader  # type: ignore[no-any-return]


def like(gateway: Gateway, *, load: Callable[[Path], config.Settings]) -> Reloader:
    """Another reloader for `gateway`'s exchange, services and counter, loading the config with `load`."""
    running = reloader(gateway)
    return Reloader(gateway.exchange, running.services, running.counter, load=load)


def reloads(text: str) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_config_reloads"
        for sample in family.samples
        if sample.name == "gateway_config_reloads_total"
    }


async def test_reload_adds_a_publisher(make_gateway: Any, issuer: TestIssuer) -> None:
    """After publishers.toml gains a publisher and the config is reloaded, that publisher's jobs mint."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    token = issuer.gitlab_token(project_path="group/release")
    assert error_code(await gateway.mint(token)) == "invalid-publisher"

    write_config(directory_of(gateway), {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, RELEASE])
    assert await reloader(gateway).reload() is True

    response = await gateway.mint(token)
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == ["release-project"]
    assert reloads((await gateway.client.get("/metrics")).text) == {"success": 1.0}


async def test_bad_config_is_refused_whole_and_the_old_one_stays(
    make_gateway: Any, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload with any problem changes nothing, logs the problem and counts a failure."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    directory = directory_of(gateway)
    # A new publisher (which would be welcome) next to one naming an unknown issuer (which is not).
    write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, RELEASE, PUBLISHER | {"issuer": "nope"}])

    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        assert await reloader(gateway).reload() is False
    assert "names no issuer" in caplog.text

    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    refused = await gateway.mint(issuer.gitlab_token(project_path="group/release"))
    assert error_code(refused) == "invalid-publisher"
    assert reloads((await gateway.client.get("/metrics")).text) == {"failure": 1.0}


async def test_reload_keeps_the_keys_of_unchanged_issuers(make_gateway: Any, issuer: TestIssuer) -> None:
    """An issuer whose url, CA and algorithms did not change keeps its cached keys across a reload."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    write_config(directory_of(gateway), {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, RELEASE])
    assert await reloader(gateway).reload()
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)


async def test_reload_refetches_keys_of_a_changed_issuer(make_gateway: Any, issuer: TestIssuer) -> None:
    """An issuer whose fetching settings changed starts from an empty cache."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    changed = gitlab_issuer(issuer, algorithms=["RS256", "PS256"])
    write_config(directory_of(gateway), {"gitlab-com": changed}, [PUBLISHER])
    assert await reloader(gateway).reload()
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert issuer.jwks_count == 2


async def test_reload_applies_a_relaxed_policy_to_a_refused_token(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token refused by policy is not spent, so it mints once the operator relaxes the policy by reloading."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, runner_environments=["gitlab-hosted"])})
    token = issuer.gitlab_token(runner_environment="self-hosted")
    assert error_code(await gateway.mint(token)) == "invalid-publisher"
    write_config(directory_of(gateway), {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    assert await reloader(gateway).reload()
    assert (await gateway.mint(token)).status_code == 200


async def test_reload_rotates_the_signing_key(make_gateway: Any, issuer: TestIssuer, tmp_path: Path) -> None:
    """Reloading with a new signing_key and the old one under previous_signing_keys publishes both, signs with new."""
    old, new = generate_key(), generate_key()
    (tmp_path / "old.json").write_text(json.dumps(old.as_dict(private=True)))
    (tmp_path / "new.json").write_text(json.dumps(new.as_dict(private=True)))
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, signing_key=str(tmp_path / "old.json"))
    write_config(
        directory_of(gateway),
        {"gitlab-com": gitlab_issuer(issuer)},
        [PUBLISHER],
        signing_key=str(tmp_path / "new.json"),
        previous_signing_keys=[str(tmp_path / "old.json")],
    )
    assert await reloader(gateway).reload()
    kids = [key["kid"] for key in (await gateway.client.get("/.well-known/jwks.json")).json()["keys"]]
    assert kids == [new.thumbprint(), old.thumbprint()]
    minted = (await gateway.mint(issuer.gitlab_token())).json()["token"]
    header = json.loads(base64.urlsafe_b64decode(minted.split(".")[0] + "=="))
    assert header["kid"] == new.thumbprint()


async def test_changed_file_is_noticed(make_gateway: Any, issuer: TestIssuer) -> None:
    """A change to a watched file (here publishers.toml) is seen by the reloader, and an unchanged tree is not."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    watcher = reloader(gateway)
    assert not watcher.changed()
    publishers = directory_of(gateway) / "publishers.toml"
    publishers.write_text(publishers.read_text() + "\n# touched\n")
    os.utime(publishers, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert watcher.changed()
    assert await watcher.reload()
    assert not watcher.changed()


async def test_renaming_an_issuer_does_not_make_a_spent_token_new(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token spent before a reload that renames its issuer (same url) is still refused as reused after it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    token = issuer.gitlab_token()
    assert (await gateway.mint(token)).status_code == 200
    write_config(directory_of(gateway), {"gitlab": gitlab_issuer(issuer)}, [PUBLISHER | {"issuer": "gitlab"}])
    assert await reloader(gateway).reload()
    assert [i.name for i in gateway.exchange.settings.issuers.values()] == ["gitlab"]
    again = await gateway.mint(token)
    assert (again.status_code, error_code(again)) == (422, "invalid-reuse-token")
    assert "already exchanged" in description(again)


def write_projects(directory: Path, issuer: TestIssuer, project: str) -> None:
    """Write publishers.toml naming `project`, with an mtime no earlier write can share (coarse file clocks)."""
    write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"projects": [project]}])
    publishers = directory / "publishers.toml"
    stamp = time.time_ns() + len(project) * 1_000_000_000
    os.utime(publishers, ns=(stamp, stamp))


def projects_in_force(gateway: Gateway) -> tuple[str, ...]:
    return gateway.exchange.settings.publishers[0].projects


async def test_file_changed_while_a_reload_loads_is_still_seen_as_changed(
    make_gateway: Any, issuer: TestIssuer
) -> None:
    """A file changed while a reload is reading the config stays "changed", so the watch applies it next."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    directory = directory_of(gateway)

    def load_then_file_changes(path: Path) -> config.Settings:
        settings = config.load(path)
        write_projects(directory, issuer, "second-save")  # the editor's next save lands mid-reload
        return settings

    slow = like(gateway, load=load_then_file_changes)
    write_projects(directory, issuer, "first")
    assert await slow.reload()
    assert projects_in_force(gateway) == ("first",)
    assert slow.changed()
    assert await reloader(gateway).reload()
    assert projects_in_force(gateway) == ("second-save",)


async def test_overlapping_reloads_apply_the_later_one(make_gateway: Any, issuer: TestIssuer) -> None:
    """Two overlapping reloads (SIGHUP and the watch) run one after the other, so the later file wins."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    directory = directory_of(gateway)
    entered, release = threading.Event(), threading.Event()
    calls = 0

    def slow_first_load(path: Path) -> config.Settings:
        # Runs in the reload's worker thread, so blocking here stands for a large file still parsing.
        nonlocal calls
        calls += 1
        settings = config.load(path)
        if calls == 1:
            entered.set()
            release.wait(10)
        return settings

    slow = like(gateway, load=slow_first_load)
    write_projects(directory, issuer, "older")
    first = asyncio.create_task(slow.reload())
    assert await asyncio.to_thread(entered.wait, 5)  # the first reload has read "older"
    write_projects(directory, issuer, "newer")
    second = asyncio.create_task(slow.reload())
    try:
        # Time enough for the second reload to finish if nothing held it back; serialized, it waits for the first.
        await asyncio.wait({second}, timeout=0.3)
        assert not second.done()
    finally:
        release.set()
    assert await first and await second
    assert projects_in_force(gateway) == ("newer",)
    assert not slow.changed()


# --- a real process: SIGHUP and the file watch ------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, issuer: TestIssuer) -> Iterator[GatewayProcess]:
    """`gateway serve` as a real process with the file watch every 0.2 s, answering /livez."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], url=base, reload_interval=0.2)
    with GatewayProcess(path, port=port).wait() as server:
        yield server


async def until_status(client: httpx.AsyncClient, base: str, token_of: Any, status: int) -> httpx.Response:
    """Mint with fresh tokens until the answer has `status` (the reload happens in another process)."""
    async with asyncio.timeout(10):
        while True:
            response = await client.post(f"{base}/_/oidc/mint-token", json={"token": token_of()})
            if response.status_code == status:
                return response
            await asyncio.sleep(0.05)


async def test_sighup_reloads_a_running_server(served: GatewayProcess, issuer: TestIssuer, tmp_path: Path) -> None:
    """A running `gateway serve` reloads on SIGHUP; a bad config then is refused and counted, the old one kept."""
    process, base = served.process, served.base
    token_of = lambda: issuer.gitlab_token(project_path="group/release")  # noqa: E731
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{base}/_/oidc/mint-token", json={"token": token_of()})).status_code == 422
        write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, RELEASE], url=base, reload_interval=0)
        process.send_signal(signal.SIGHUP)
        await until_status(client, base, token_of, 200)

        (tmp_path / "publishers.toml").write_text("[[publisher]]\nissuer = 1\n")
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            # Polling another process's metrics: there is no event to wait on across processes.
            # The file watch may see the change before or after the signal: at least one failure, not two if
            # both happen (a refused config is not retried until it changes again).
            while reloads((await client.get(f"{base}/metrics")).text).get("failure", 0) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert (await client.post(f"{base}/_/oidc/mint-token", json={"token": token_of()})).status_code == 200
        assert process.poll() is None


async def test_file_watch_reloads_a_running_server(served: GatewayProcess, issuer: TestIssuer, tmp_path: Path) -> None:
    """A running `gateway serve` picks up a changed publishers.toml by itself."""
    base = served.base
    write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, RELEASE], url=base, reload_interval=0.2)
    async with httpx.AsyncClient() as client:
        response = await until_status(client, base, lambda: issuer.gitlab_token(project_path="group/release"), 200)
    assert response.json()["projects"] == ["release-project"]


async def test_refused_config_is_not_retried_until_it_changes(make_gateway: Any, issuer: TestIssuer) -> None:
    """After a refused reload the watch sees no change, so broken files are not reloaded (and logged) again."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    watcher = reloader(gateway)
    publishers = directory_of(gateway) / "publishers.toml"
    publishers.write_text("[[publisher]]\nissuer = 1\n")
    os.utime(publishers, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert watcher.changed()
    assert await watcher.reload() is False
    assert not watcher.changed()


async def test_a_mint_under_way_finishes_under_the_config_it_started_with(
    make_gateway: Any, issuer: TestIssuer
) -> None:
    """A reload landing while a mint waits for the issuer's keys does not change that mint's config halfway: it
    matches the publishers it started with, and the next mint the new ones."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    issuer.delay = 0.5
    issuer.paths_misbehave = {"jwks"}
    under_way = asyncio.create_task(gateway.mint(issuer.gitlab_token()))
    async with asyncio.timeout(5):
        # Wall time: waiting for the issuer's thread (another thread, no event to share) to see the request.
        while not issuer.jwks_count:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    write_config(directory_of(gateway), {"gitlab-com": gitlab_issuer(issuer)}, [RELEASE])
    assert await reloader(gateway).reload()
    response = await under_way
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == ["sampleproject"]
    assert error_code(await gateway.mint(issuer.gitlab_token())) == "invalid-publisher"


async def test_renaming_an_issuer_keeps_its_cached_keys(make_gateway: Any, issuer: TestIssuer) -> None:
    """The key cache is keyed by an issuer's trust (URL, CA, algorithms), so a reload that only renames it fetches
    nothing."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    write_config(directory_of(gateway), {"gitlab": gitlab_issuer(issuer)}, [PUBLISHER | {"issuer": "gitlab"}])
    assert await reloader(gateway).reload()
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)


async def test_startup_and_each_reload_settle_the_heap_and_free_the_replaced_config(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """The app freezes what it holds for good when it starts (app.settle_heap: full collections then skip it), and
    settles again after a reload: the config it replaced is freed, not kept in the frozen generation."""
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, (PUBLISHER,), reload_interval=0)
    app = create_app(config.load(path, {}))
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 0
            replaced = weakref.ref(app.state.exchange.publishers)
            write_config(
                tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, (PUBLISHER, {**PUBLISHER, "workflow": "b.yml"}),
                reload_interval=0,
            )  # fmt: skip
            assert await app.state.reloader.reload()
            assert len(app.state.exchange.publishers) == 2
            assert replaced() is None
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
