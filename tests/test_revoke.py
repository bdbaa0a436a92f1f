"""Emergency revocation: `gateway revoke` refuses a repository's mints and its upload tokens on running gateways.

The end-to-end tests run what an operator runs: real `gateway serve` processes (two replicas on a real Redis, or one
with its state file), the real `python -m gateway revoke` CLI in a subprocess, and mints and uploads over HTTP. The
rest drive an app over httpx's ASGI transport, with the CLI called in-process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import config
from gateway.__main__ import main
from gateway.app import create_app
from gateway.mint import generate_key
from gateway.state import FileState, Revocation
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config
from tests.processes import GatewayProcess, gateway_command, gateway_environ, stop_all
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_upload import CONTENT_TYPE, FakeIndex, upload_body

# What the issue demands: every replica honours a new revocation (and its lifting) within this many seconds.
HONOURED_WITHIN = 2.0
UPSTREAM_PASSWORD = "operator-secret"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The gateway's command line, with the upstream password its config names in the environment."""
    return gateway_command(config, *args, UPSTREAM_PASSWORD=UPSTREAM_PASSWORD)


def mint(base: str, token: str) -> httpx.Response:
    return httpx.post(f"{base}/_/oidc/mint-token", json={"token": token}, timeout=10)


def upload_headers(token: str) -> dict[str, str]:
    credentials = base64.b64encode(f"__token__:{token}".encode()).decode()
    return {"Authorization": f"Basic {credentials}", "Content-Type": CONTENT_TYPE}


def upload(base: str, token: str) -> httpx.Response:
    return httpx.post(f"{base}/legacy/", content=upload_body(), headers=upload_headers(token), timeout=10)


def wait_for(base: str, issuer: TestIssuer, want: int, since: float) -> httpx.Response:
    """Mint fresh tokens at `base` until one answers `want`; fail if that takes longer than HONOURED_WITHIN
    seconds after `since` (when the CLI finished)."""
    while True:
        response = mint(base, issuer.gitlab_token())
        if response.status_code == want:
            return response
        assert time.monotonic() - since < HONOURED_WITHIN, (
            f"{base} still answers {response.status_code} {HONOURED_WITHIN:g} s after the CLI finished: {response.text}"
        )
        time.sleep(0.05)


@pytest.fixture(scope="module")
def index() -> Iterator[FakeIndex]:
    """The upstream index behind /legacy/: a real HTTP server that records what reaches it."""
    index = FakeIndex().start()
    yield index
    index.stop()


def gateway_config(directory: Path, issuer: TestIssuer, index: FakeIndex, **gateway: Any) -> Path:
    """issuers.toml (with [upstream]) and publishers.toml for real gateway processes sharing one signing key."""
    directory.mkdir(exist_ok=True)
    key = directory / "signing-key.json"
    if not key.exists():
        key.write_text(json.dumps(generate_key().as_dict(private=True)))
    path = write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], signing_key=key.name, **gateway)
    upstream = f'\n[upstream]\nurl = "{index.url}"\nusername = "operator"\npassword_env = "UPSTREAM_PASSWORD"\n'
    path.write_text(path.read_text() + upstream)
    return path


def serve(config: Path, count: int) -> list[GatewayProcess]:
    replicas = [GatewayProcess(config, env=gateway_environ(UPSTREAM_PASSWORD=UPSTREAM_PASSWORD)) for _ in range(count)]
    try:
        for replica in replicas:
            replica.wait("/readyz")
    except BaseException:
        stop_all(replicas)
        raise
    return replicas


def revocation_id(output: str) -> str:
    ids = [word.removeprefix("id=") for word in output.split() if word.startswith("id=")]
    assert len(ids) == 1, output
    return ids[0]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_cli_revocation_reaches_two_replicas_and_their_upload_tokens(
    tmp_path: Path, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A revocation made with the CLI refuses mints on two running replicas within 2 s and an upload token minted
    before it at /legacy/; lifted, both replicas mint again."""
    with RedisServer() as redis_server:
        config = gateway_config(tmp_path, issuer, index, redis_url=redis_server.url)
        replicas = serve(config, 2)
        try:
            first, second = (replica.base for replica in replicas)
            minted = mint(first, issuer.gitlab_token())
            assert minted.status_code == 200, minted.text
            upload_token = minted.json()["token"]

            done = cli(
                config,
                "revoke",
                "--issuer",
                "gitlab-com",
                "--repository",
                "Group/Project",
                "--reason",
                "maintainer account compromised",
            )
            finished = time.monotonic()
            assert done.returncode == 0, done.stderr
            for base in (first, second):
                refused = wait_for(base, issuer, 422, finished)
                assert error_code(refused) == "invalid-publisher"
                assert "maintainer account compromised" in description(refused)

            answer = upload(second, upload_token)
            assert answer.status_code == 403
            assert "maintainer account compromised" in answer.text
            assert index.received == []

            listed = cli(config, "revoke", "--list")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.startswith("id=")
            lifted = cli(config, "revoke", "--lift", revocation_id(listed.stdout))
            finished = time.monotonic()
            assert lifted.returncode == 0, lifted.stderr
            for base in (first, second):
                wait_for(base, issuer, 200, finished)
            assert cli(config, "revoke", "--list").stdout == ""
        finally:
            stop_all(replicas)


def test_cli_revocation_reaches_a_gateway_through_its_state_file(
    tmp_path: Path, issuer: TestIssuer, index: FakeIndex
) -> None:
    """Without Redis, a revocation the CLI writes to the state file refuses a running gateway's mints within 2 s
    and the upload tokens it minted inside the window; lifted, it mints again."""
    config = gateway_config(tmp_path, issuer, index)
    (replica,) = serve(config, 1)
    try:
        minted = mint(replica.base, issuer.gitlab_token())
        assert minted.status_code == 200, minted.text
        index.received.clear()

        done = cli(
            config,
            "revoke",
            "--issuer",
            "gitlab-com",
            "--repository",
            "group/project",
            "--since",
            "2000-01-01T00:00:00Z",
            "--reason",
            "leaked runner token",
        )
        finished = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "gateway-state.json").exists()
        refused = wait_for(replica.base, issuer, 422, finished)
        assert "leaked runner token" in description(refused)
        answer = upload(replica.base, minted.json()["token"])
        assert answer.status_code == 403 and "leaked runner token" in answer.text
        assert index.received == []

        lifted = cli(config, "revoke", "--lift", revocation_id(done.stdout))
        finished = time.monotonic()
        assert lifted.returncode == 0, lifted.stderr
        wait_for(replica.base, issuer, 200, finished)
    finally:
        replica.stop()


def test_concurrent_cli_writes_lose_nothing(tmp_path: Path, issuer: TestIssuer) -> None:
    """Several `gateway revoke` processes writing one state file at once each keep their revocation."""
    config = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    command = [sys.executable, "-m", "gateway", "revoke", "--config", str(config), "--issuer", "gitlab-com"]
    processes = [
        subprocess.Popen(
            [*command, "--repository", f"group/project-{n}", "--reason", f"incident {n}"],
            env=gateway_environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n in range(4)
    ]
    for process in processes:
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
        if process.stderr:
            process.stderr.close()
    listed = cli(config, "revoke", "--list")
    assert sorted(line.split()[2] for line in listed.stdout.splitlines()) == [
        f"repository=group/project-{n}" for n in range(4)
    ]


# In-process: the window, matching, the audit, the command line's rules.


def run(config: Path, *args: str) -> int:
    return main([*args, "--config", str(config)])


async def revoke(config: Path, *args: str) -> int:
    # main() runs its own event loop, so it runs in a thread here.
    return await asyncio.to_thread(run, config, "revoke", *args)


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat()


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """The CLI configures logging for its process; called in-process, it must not keep this one's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def config_of(gateway: Gateway) -> Path:
    path = gateway.exchange.settings.config_path
    assert path is not None
    return path


async def refreshed(gateway: Gateway) -> None:
    """Make the gateway look at its state now rather than within the second (what the refresh does by itself)."""
    state = gateway.exchange.state
    assert isinstance(state, FileState)
    state.invalidate()


@pytest.mark.parametrize(
    ("since", "until", "refused"),
    [
        (None, None, True),
        (-60, None, True),
        (None, 60, True),
        (-60, 60, True),
        (60, None, False),
        (None, -60, False),
        (-120, -60, False),
    ],
)
async def test_window_is_compared_with_the_id_tokens_iat(
    gateway: Gateway, issuer: TestIssuer, since: int | None, until: int | None, refused: bool
) -> None:
    """A mint is refused when its ID token's iat lies in the window, a side without a bound being open."""
    now = gateway.exchange.clock()
    args = ["--issuer", "gitlab-com", "--repository", "group/project", "--reason", "incident"]
    if since is not None:
        args += ["--since", iso(now + since)]
    if until is not None:
        args += ["--until", iso(now + until)]
    assert await revoke(config_of(gateway), *args) == 0
    await refreshed(gateway)
    response = await gateway.mint(issuer.gitlab_token(now=int(now)))
    if refused:
        assert error_code(response) == "invalid-publisher"
        assert "revoked by this gateway's operator" in description(response)
    else:
        assert response.status_code == 200, response.text


async def test_repository_compared_as_matching_does(gateway: Gateway, issuer: TestIssuer) -> None:
    """A revocation of GROUP/Project refuses group/project (ASCII case-insensitive), and not another repository."""
    config = config_of(gateway)
    assert await revoke(config, "--issuer", "gitlab-com", "--repository", "GROUP/Project", "--reason", "x") == 0
    await refreshed(gateway)
    assert error_code(await gateway.mint(issuer.gitlab_token())) == "invalid-publisher"
    other = await gateway.mint(issuer.gitlab_token(project_path="group/other"))
    assert "revoked" not in description(other)


async def test_revocation_follows_the_issuer_url_not_its_name(
    issuer: TestIssuer, other_issuer: TestIssuer, make_gateway: Any
) -> None:
    """A revocation for one issuer does not refuse the same path from another issuer."""
    both = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer), "cern": gitlab_issuer(other_issuer)},
        [PUBLISHER, PUBLISHER | {"issuer": "cern"}],
    )
    config = config_of(both)
    assert await revoke(config, "--issuer", "cern", "--repository", "group/project", "--reason", "x") == 0
    await refreshed(both)
    assert (await both.mint(issuer.gitlab_token())).status_code == 200
    assert error_code(await both.mint(other_issuer.gitlab_token())) == "invalid-publisher"


async def test_revoke_lift_and_refusal_are_audit_lines(
    gateway: Gateway, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoking and lifting (in the CLI's log) and the refusal between (in the gateway's) are audit lines naming
    the revocation."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    config = config_of(gateway)
    done = await asyncio.to_thread(
        cli, config, "revoke", "--issuer", "gitlab-com", "--repository", "group/project", "--reason", "x"
    )
    await refreshed(gateway)
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 422
    (revocation,) = await gateway.exchange.state.revocations()
    lifted = await asyncio.to_thread(cli, config, "revoke", "--lift", revocation.id)
    (revoked_line,) = audit_lines(done.stderr)
    (lifted_line,) = audit_lines(lifted.stderr)
    assert (revoked_line["event"], revoked_line["id"], revoked_line["reason"]) == ("revoke", revocation.id, "x")
    assert (lifted_line["event"], lifted_line["id"]) == ("lift", revocation.id)
    (refusal,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert (refusal["outcome"], refusal["revocation"]) == ("invalid-publisher", revocation.id)


def audit_lines(stderr: str) -> list[dict[str, Any]]:
    marker = "gateway.audit: "
    return [json.loads(line.partition(marker)[2]) for line in stderr.splitlines() if marker in line]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repository", "group/project", "--reason", "x"], "--issuer"),
        (["--issuer", "nope", "--repository", "group/project", "--reason", "x"], "names no issuer"),
        (["--issuer", "gitlab-com", "--reason", "x"], "--repository"),
        (["--issuer", "gitlab-com", "--repository", "gröup/project", "--reason", "x"], "ASCII"),
        (["--issuer", "gitlab-com", "--repository", "group/project"], "--reason"),
        (
            ["--issuer", "gitlab-com", "--repository", "group/project", "--reason", "x", "--since", "2026-01-01T00:00"],
            "no zone",
        ),
        (
            ["--issuer", "gitlab-com", "--repository", "group/project", "--reason", "x", "--until", "tomorrow"],
            "not an ISO 8601 time",
        ),
        (
            [
                "--issuer",
                "gitlab-com",
                "--repository",
                "group/project",
                "--reason",
                "x",
                "--since",
                "2026-02-01T00:00Z",
                "--until",
                "2026-01-01T00:00Z",
            ],
            "after --until",
        ),
        (["--lift", "0123456789ab"], "no revocation has id"),
        (["--list", "--issuer", "gitlab-com"], "stand alone"),
    ],
)
def test_bad_revoke_command_lines_exit_1_with_a_message(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str], args: Sequence[str], message: str
) -> None:
    """A revoke command line that cannot be carried out exits 1, says why, and records nothing."""
    config = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    assert run(config, "revoke", *args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gateway-state.json").exists()


def test_list_prints_one_revocation_a_line(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`revoke --list` prints each revocation on one line starting id=ID, with its window and reason."""
    config = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    base = ["revoke", "--issuer", "gitlab-com", "--reason", "two\nlines"]
    assert run(config, *base, "--repository", "a/b", "--since", "2026-01-01T01:00:00+01:00") == 0
    assert run(config, *base, "--repository", "c/d") == 0
    capsys.readouterr()
    assert run(config, "revoke", "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("id=") for line in lines)
    assert "issuer=gitlab-com repository=a/b since=2026-01-01T00:00:00Z until=-" in lines[0]
    assert lines[0].endswith("reason=two lines")


async def test_state_file_that_cannot_be_read_fails_mints_closed(gateway: Gateway, issuer: TestIssuer) -> None:
    """A gateway that cannot read its state file at start refuses to mint (503), rather than ignore revocations."""
    (config_of(gateway).parent / "gateway-state.json").write_text("{not json")
    for _ in range(2):  # the second, too: a failed read is never taken for an empty state
        response = await gateway.mint(issuer.gitlab_token())
        assert response.status_code == 503
        assert error_code(response) == "replay-store-unavailable"


async def test_unreadable_state_keeps_the_last_revocations(gateway: Gateway, issuer: TestIssuer) -> None:
    """A state file broken after it was read keeps the revocations last read in force."""
    state = gateway.exchange.state
    await state.revoke(Revocation(id="r1", issuer_url=issuer.url, repository="group/project", reason="x"))
    assert error_code(await gateway.mint(issuer.gitlab_token())) == "invalid-publisher"
    (config_of(gateway).parent / "gateway-state.json").write_text("{broken")
    await refreshed(gateway)
    assert error_code(await gateway.mint(issuer.gitlab_token())) == "invalid-publisher"


def test_state_file_setting_is_relative_to_the_config(tmp_path: Path, issuer: TestIssuer) -> None:
    """[gateway] state_file names the file, relative to issuers.toml, that the CLI writes."""
    config = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], state_file="state/pins.json")
    (tmp_path / "state").mkdir()
    assert run(config, "revoke", "--issuer", "gitlab-com", "--repository", "a/b", "--reason", "x") == 0
    document = json.loads((tmp_path / "state" / "pins.json").read_text())
    (revocation,) = document["revocations"].values()
    assert revocation["issuer_url"] == issuer.url and revocation["repository"] == "a/b"
    assert not (tmp_path / "gateway-state.json").exists()


def test_revoke_with_redis_down_exits_1(tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]) -> None:
    """A revocation that cannot be written to the gateway's Redis exits 1 and says the state is unavailable."""
    with RedisServer() as redis_server:
        url = redis_server.url
    config = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], redis_url=url)
    assert run(config, "revoke", "--issuer", "gitlab-com", "--repository", "a/b", "--reason", "x") == 1
    assert "unavailable" in capsys.readouterr().err


async def test_upload_tokens_outside_the_window_still_upload(
    tmp_path: Path, issuer: TestIssuer, index: FakeIndex
) -> None:
    """/legacy/ refuses an upload token minted inside a revocation's window and forwards one minted after it."""
    path = gateway_config(tmp_path, issuer, index)
    settings = config.load(path, {**os.environ, "UPSTREAM_PASSWORD": UPSTREAM_PASSWORD})
    app = create_app(settings)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway.test")
    try:
        before = (await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})).json()["token"]
        await app.state.exchange.state.revoke(
            Revocation(id="r1", issuer_url=issuer.url, repository="group/project", reason="x", until=time.time())
        )
        # iat is in whole seconds: the next token is minted in a later second than the window's end.
        await asyncio.sleep(max(0.0, math.ceil(time.time()) + 0.05 - time.time()) + 1)
        after = (await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})).json()["token"]
        index.received.clear()
        refused = await client.post("/legacy/", content=upload_body(), headers=upload_headers(before))
        assert refused.status_code == 403 and "revoked" in refused.text
        assert index.received == []
        forwarded = await client.post("/legacy/", content=upload_body(), headers=upload_headers(after))
        assert forwarded.status_code == 200, forwarded.text
        assert len(index.received) == 1
    finally:
        await client.aclose()
        await app.state.upload.aclose()
        await app.state.exchange.keys.aclose()
        await app.state.exchange.store.aclose()


async def test_concurrent_revocations_in_redis_lose_nothing(make_gateway: Any, issuer: TestIssuer) -> None:
    """Many revocations written to Redis at once (compare-and-set on one document) are all kept."""
    with RedisServer() as redis_server:
        gateway: Gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=redis_server.url)
        state = gateway.exchange.state
        await asyncio.gather(
            *(
                state.revoke(Revocation(id=f"r{n}", issuer_url=issuer.url, repository=f"g/p{n}", reason="x"))
                for n in range(10)
            )
        )
        assert sorted(r.id for r in await state.revocations()) == sorted(f"r{n}" for n in range(10))
