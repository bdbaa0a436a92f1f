from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette

from gateway import config
from gateway.app import create_app
from gateway.exchange import Exchange
from gateway.testing import FakeClock, TestIssuer


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def _issuer(ca: trustme.CA) -> Iterator[TestIssuer]:
    with TestIssuer(ca=ca) as issuer:
        yield issuer


@pytest.fixture
def issuer(_issuer: TestIssuer) -> Iterator[TestIssuer]:
    """The shared test issuer, with its misbehaviour knobs and counters reset around each test."""
    _issuer.reset()
    yield _issuer
    _issuer.reset()
    for kid in _issuer.published_kids:
        if kid != _issuer.signing_kid:
            _issuer.retire(kid)


@pytest.fixture(scope="session")
def other_issuer(ca: trustme.CA) -> Iterator[TestIssuer]:
    """A second issuer, standing for a self-hosted GitLab next to gitlab.com."""
    with TestIssuer(path="/gitlab", ca=ca) as issuer:
        yield issuer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # An inline table, e.g. `deny = {event_name = ["push"]}` for [issuers.X.deny].
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(
    directory: Path,
    issuers: Mapping[str, Mapping[str, Any]],
    publishers: Sequence[Mapping[str, Any]] = (),
    **gateway: Any,
) -> Path:
    """Write a real issuers.toml and publishers.toml, as an operator would, and return the config path."""
    table = {"audience": "pypi", "url": "https://gateway.test", "publishers": "publishers.toml"} | gateway
    lines = ["[gateway]"] + [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    for name, fields in issuers.items():
        lines += ["", f"[issuers.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    path = directory / "issuers.toml"
    path.write_text("\n".join(lines) + "\n")
    entries = []
    for publisher in publishers:
        entries += ["[[publisher]]"] + [f"{k} = {toml_value(v)}" for k, v in publisher.items()] + [""]
    (directory / "publishers.toml").write_text("\n".join(entries))
    return path


def gitlab_issuer(issuer: TestIssuer, **extra: Any) -> dict[str, Any]:
    return {"url": issuer.url, "kind": "gitlab", "ca_bundle": str(issuer.ca_path)} | extra


PUBLISHER = {
    "issuer": "gitlab-com",
    "repository": "group/project",
    "workflow": ".gitlab-ci.yml",
    "projects": ["sampleproject"],
}


class Gateway:
    """An app built from real config files, driven over HTTP through httpx's ASGI transport."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.exchange: Exchange = app.state.exchange

    async def mint(self, token: str) -> httpx.Response:
        return await self.client.post("/_/oidc/mint-token", json={"token": token})


@pytest.fixture
async def make_gateway(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Any]:
    made: list[Gateway] = []
    counter = 0

    async def make(
        issuers: Mapping[str, Mapping[str, Any]],
        publishers: Sequence[Mapping[str, Any]] = (PUBLISHER,),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **gateway: Any,
    ) -> Gateway:
        nonlocal counter
        counter += 1
        directory = tmp_path / f"gateway-{counter}"
        directory.mkdir()
        settings = config.load(write_config(directory, issuers, publishers, **gateway))
        app = create_app(settings, clock=clock, transport=transport)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway.test")
        made.append(Gateway(app, client))
        return made[-1]

    yield make
    for gateway in made:
        await gateway.client.aclose()
        await gateway.exchange.keys.aclose()
        await gateway.exchange.store.aclose()
        await gateway.app.state.upload.aclose()


@pytest.fixture
async def gateway(make_gateway: Any, issuer: TestIssuer) -> Gateway:
    """A gateway trusting the test issuer as `gitlab-com`, with one publisher for group/project."""
    return await make_gateway({"gitlab-com": gitlab_issuer(issuer)})  # type: ignore[no-any-return]


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["message"] == "Token request failed"
    assert len(body["errors"]) == 1
    return body["errors"][0]["code"]  # type: ignore[no-any-return]


def description(response: httpx.Response) -> str:
    return response.json()["errors"][0]["description"]  # type: ignore[no-any-return]
