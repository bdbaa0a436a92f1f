"""Operations: metrics, the audit log, the client address behind proxies, rate limits and readiness.

Each test drives a real app (built from real config files by the conftest fixtures) over HTTP through httpx's
ASGI transport, with real tokens from the HTTPS test issuer; the Redis ones use a `redis-server` of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import config, logs
from gateway.app import create_app
from gateway.errors import ConfigError
from gateway.keys.cache import FAILURE_BACKOFF
from gateway.routes import client_address
from gateway.store import jti_key
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config
from tests.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

MakeGateway = Callable[..., Any]
At = Callable[[Gateway, str], httpx.AsyncClient]

AUDIT_FIELDS = {
    "event", "outcome", "client", "issuer", "repository", "workflow", "ref", "sha", "environment", "publisher",
    "projects", "jti_hash", "at", "identity", "claims",
}  # fmt: skip


@pytest.fixture
async def at() -> AsyncIterator[At]:
    """Clients of a gateway whose TCP peer address is the one given, as a socket would report it."""
    opened: list[httpx.AsyncClient] = []

    def make(gateway: Gateway, address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=gateway.app, client=(address, 1234))
        opened.append(httpx.AsyncClient(transport=transport, base_url="https://gateway.test"))
        return opened[-1]

    yield make
    for client in opened:
        await client.aclose()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of this test's own (tests here kill it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def shared_gateway(make_gateway: MakeGateway, redis_server: RedisServer) -> MakeGateway:
    """make_gateway with redis_url set to this test's Redis."""

    async def make(issuers: dict[str, Any], **gateway: Any) -> Gateway:
        return await make_gateway(issuers, redis_url=redis_server.url, **gateway)  # type: ignore[no-any-return]

    return make


async def mint(client: httpx.AsyncClient, token: str, headers: Sequence[tuple[str, str]] = ()) -> httpx.Response:
    return await client.post("/_/oidc/mint-token", json={"token": token}, headers=list(headers))


def samples(text: str, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called `name` in Prometheus text, keyed by the values of `labels`."""
    return {
        tuple(sample.labels[label] for label in labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def metrics(gateway: Gateway) -> str:
    response = await gateway.client.get("/metrics")
    assert response.status_code == 200
    return response.text


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "gateway.audit"]


def outcome_of(response: httpx.Response) -> str:
    return "success" if response.status_code == 200 else error_code(response)


def with_signature_of(token: str, other: str) -> str:
    """`token` carrying `other`'s signature: well formed, signed by the issuer's key, but not over this payload."""
    return token.rpartition(".")[0] + "." + other.rpartition(".")[2]


# Metrics


async def test_metrics_after_a_known_sequence(gateway: Gateway, issuer: TestIssuer) -> None:
    """3 successes, 2 invalid-publisher, 1 untrusted issuer, 1 reuse: exactly those counts, one fetch, 7 timings."""
    first = issuer.gitlab_token()
    sequence = [
        (first, 200),
        (issuer.gitlab_token(), 200),
        (issuer.gitlab_token(), 200),
        (issuer.gitlab_token(workflow="release.yml"), 422),
        (issuer.gitlab_token(project_path="group/other"), 422),
        (issuer.gitlab_token(iss="https://untrusted.example"), 422),
        (first, 422),
    ]
    for token, status in sequence:
        response = await gateway.mint(token)
        assert response.status_code == status, response.text

    text = await metrics(gateway)
    assert samples(text, "gateway_mint_requests_total", "issuer", "outcome") == {
        ("gitlab-com", "success"): 3,
        ("gitlab-com", "invalid-publisher"): 2,
        ("-", "invalid-payload"): 1,
        ("gitlab-com", "invalid-reuse-token"): 1,
    }
    assert samples(text, "gateway_upstream_fetches_total", "issuer", "outcome") == {("gitlab-com", "ok"): 1}
    # Six tokens of a trusted issuer needed a key: the first from upstream, the rest from memory.
    assert samples(text, "gateway_key_lookups_total", "level") == {("upstream",): 1, ("memory",): 5}
    assert samples(text, "gateway_mint_seconds_count") == {(): 7}
    buckets = samples(text, "gateway_mint_seconds_bucket", "le")
    assert buckets[("+Inf",)] == 7
    assert samples(text, "gateway_redis_errors_total") == {(): 0}


async def test_failed_fetch_is_counted_as_error(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """An issuer answering 500 counts one fetch error and an issuer-unavailable mint; the retry after it counts ok."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    issuer.status = 500
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 503 and error_code(response) == "issuer-unavailable"
    text = await metrics(gateway)
    assert samples(text, "gateway_upstream_fetches_total", "issuer", "outcome") == {("gitlab-com", "error"): 1}
    assert samples(text, "gateway_mint_requests_total", "issuer", "outcome") == {
        ("gitlab-com", "issuer-unavailable"): 1
    }
    assert samples(text, "gateway_key_lookups_total", "level") == {}

    issuer.status = None
    clock.advance(FAILURE_BACKOFF + 1)
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    text = await metrics(gateway)
    assert samples(text, "gateway_upstream_fetches_total", "issuer", "outcome") == {
        ("gitlab-com", "error"): 1,
        ("gitlab-com", "ok"): 1,
    }
    assert samples(text, "gateway_key_lookups_total", "level") == {("upstream",): 1}


async def test_reloads_are_counted_by_outcome(gateway: Gateway, issuer: TestIssuer) -> None:
    """A good reload counts a success, a reload of a broken file counts a failure, and neither resets the mints."""
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    reloader = gateway.app.state.reloader
    assert await reloader.reload() is True
    path = gateway.exchange.settings.config_path
    assert path is not None
    path.write_text(path.read_text() + "\n[gateway.nonsense]\n")
    assert await reloader.reload() is False

    text = await metrics(gateway)
    assert samples(text, "gateway_config_reloads_total", "outcome") == {("success",): 1, ("failure",): 1}
    assert samples(text, "gateway_mint_requests_total", "issuer", "outcome") == {("gitlab-com", "success"): 1}


async def test_apps_in_one_process_keep_separate_counters(make_gateway: MakeGateway, issuer: TestIssuer) -> None:
    """Two apps in one process each count only their own mints."""
    a = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    b = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    for _ in range(2):
        assert (await a.mint(issuer.gitlab_token())).status_code == 200
    assert (await b.mint(issuer.gitlab_token())).status_code == 200
    assert samples(await metrics(a), "gateway_mint_requests_total", "issuer", "outcome") == {
        ("gitlab-com", "success"): 2
    }
    assert samples(await metrics(b), "gateway_mint_requests_total", "issuer", "outcome") == {
        ("gitlab-com", "success"): 1
    }


# Audit log


async def test_audit_line_per_attempt_without_secrets(
    gateway: Gateway, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every attempt writes one JSON audit line with its outcome, and no log record holds a token, signature or jti."""
    caplog.set_level(logging.DEBUG)
    good = issuer.gitlab_claims()
    mismatched = issuer.gitlab_claims(workflow="release.yml")
    forged = issuer.gitlab_claims()
    untrusted = issuer.gitlab_claims(iss="https://untrusted.example")
    tokens = [issuer.sign(claims) for claims in (good, mismatched, forged, untrusted)]
    tokens[2] = with_signature_of(tokens[2], tokens[0])
    bodies = [
        json.dumps({"token": tokens[0]}),
        json.dumps({"token": tokens[1]}),
        json.dumps({"token": tokens[2]}),
        json.dumps({"token": tokens[3]}),
        "not json",
        json.dumps({"token": tokens[0]}),
    ]
    responses = []
    for body in bodies:
        responses.append(
            await gateway.client.post("/_/oidc/mint-token", content=body, headers={"content-type": "application/json"})
        )
    outcomes = [outcome_of(r) for r in responses]
    assert outcomes == [
        "success", "invalid-publisher", "invalid-token", "invalid-payload", "invalid-payload", "invalid-reuse-token",
    ]  # fmt: skip

    lines = audit_lines(caplog)
    assert [line["outcome"] for line in lines] == outcomes
    for line in lines:
        assert set(line) == AUDIT_FIELDS
        assert line["event"] == "mint"
        assert line["client"] == "127.0.0.1"
    success, mismatch, bad_signature, untrusted_issuer, garbage, reuse = lines
    # What `check --replay` re-decides from: the verified claims (never the jti or the user's e-mail), the whole
    # identity, and when it was judged.
    assert success["claims"] == {k: v for k, v in good.items() if k not in ("jti", "user_email")}
    assert success["identity"]["repository_id"] == "61254376" and success["identity"]["owner_id"] == "12885807"
    assert isinstance(success["at"], float)
    assert bad_signature["claims"] is bad_signature["identity"] is None
    assert mismatch["claims"]["ci_config_ref_uri"].endswith("//release.yml@refs/heads/main")
    assert success | {"jti_hash": None, "at": None, "identity": None, "claims": None} == {
        "event": "mint",
        "outcome": "success",
        "client": "127.0.0.1",
        "issuer": "gitlab-com",
        "repository": "group/project",
        "workflow": ".gitlab-ci.yml",
        "ref": "main",
        "sha": good["sha"],
        "environment": None,
        "publisher": [{"repository": "group/project", "workflow": ".gitlab-ci.yml", "environment": None}],
        "projects": ["sampleproject"],
        "jti_hash": None,
        "at": None,
        "identity": None,
        "claims": None,
    }
    # Verified tokens carry the hash the jti is spent under; the others have none to give.
    assert success["jti_hash"] == reuse["jti_hash"] == jti_key(issuer.url, good["jti"])
    assert mismatch["jti_hash"] == jti_key(issuer.url, mismatched["jti"])
    assert (mismatch["repository"], mismatch["workflow"], mismatch["publisher"], mismatch["projects"]) == (
        "group/project", "release.yml", [], [],
    )  # fmt: skip
    assert (bad_signature["issuer"], bad_signature["repository"], bad_signature["jti_hash"]) == (
        "gitlab-com", None, None,
    )  # fmt: skip
    assert untrusted_issuer["issuer"] is None and garbage["issuer"] is None
    assert reuse["projects"] == ["sampleproject"]

    secrets = [*tokens, *(token.rpartition(".")[2] for token in tokens)]
    secrets += [claims["jti"] for claims in (good, mismatched, forged, untrusted)]
    logged = caplog.text + "".join(json.dumps(getattr(r, "audit", None)) for r in caplog.records)
    assert [secret for secret in secrets if secret in logged] == []


async def test_audit_can_be_silenced_by_level(
    gateway: Gateway, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the audit logger above INFO, a mint writes no audit line (and still succeeds)."""
    caplog.set_level(logging.WARNING, logger="gateway.audit")
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert audit_lines(caplog) == []


TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_formatter_plain_record() -> None:
    """A plain record becomes one JSON line with time, level, logger and the formatted message."""
    record = logging.LogRecord("gateway.keys", logging.WARNING, __file__, 1, "fetch of %s failed", ("x",), None)
    line = logs.JSONFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert TIME.match(parsed.pop("time"))
    assert parsed == {"level": "warning", "logger": "gateway.keys", "message": "fetch of x failed"}


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    """A record with an exception carries the traceback as a field, still on one line."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("gateway.app", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info())
    line = logs.JSONFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed"
    assert "RuntimeError: boom" in parsed["exception"] and "Traceback" in parsed["exception"]


async def test_json_formatter_audit_record(
    gateway: Gateway, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """An audit record formatted as JSON has the audit fields at the top level and no message string."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    claims = issuer.gitlab_claims()
    assert (await gateway.mint(issuer.sign(claims))).status_code == 200
    (record,) = [r for r in caplog.records if r.name == "gateway.audit"]
    parsed = json.loads(logs.JSONFormatter().format(record))
    assert TIME.match(parsed.pop("time"))
    assert parsed.pop("level") == "info" and parsed.pop("logger") == "gateway.audit"
    assert set(parsed) == AUDIT_FIELDS
    assert parsed["outcome"] == "success" and parsed["jti_hash"] == jti_key(issuer.url, claims["jti"])


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level put back after the test reconfigures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()  # a log writer configure() started: its thread stops
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("level", "format", "expected_level", "json_lines"),
    [("warning", "json", logging.WARNING, True), ("debug", "text", logging.DEBUG, False)],
    ids=["warning-json", "debug-text"],
)
def test_configure_sets_level_and_format(
    root_logging: logging.Logger, level: str, format: str, expected_level: int, json_lines: bool
) -> None:
    """configure() leaves the root logger with the level and one handler in the format asked for."""
    logs.configure(level, format)
    assert root_logging.level == expected_level
    (handler,) = root_logging.handlers
    assert isinstance(handler.formatter, logs.JSONFormatter) is json_lines


def test_log_settings_load_from_config(tmp_path: Path, issuer: TestIssuer) -> None:
    """log_level, log_format, trusted_proxies, rate limits and drain_seconds are read from [gateway]."""
    path = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        log_level="warning",
        log_format="json",
        trusted_proxies=["10.0.0.0/8", "fd00::/8"],
        rate_limit_client="10/second;100/minute",
        rate_limit_repository="5/minute",
        drain_seconds=2.5,
    )
    settings = config.load(path, {})
    assert (settings.log_level, settings.log_format, settings.drain_seconds) == ("warning", "json", 2.5)
    assert settings.trusted_proxies == (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
    assert (settings.rate_limit_client, settings.rate_limit_repository) == ("10/second;100/minute", "5/minute")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("log_format", "xml", "log_format"),
        ("log_level", "verbose", "log_level"),
        ("trusted_proxies", ["10.0.0.0/8", "proxy.internal"], "'proxy.internal' is not an IP address"),
        ("rate_limit_client", "lots", "'lots' is not a rate"),
        ("rate_limit_repository", "5 per fortnight", "is not a rate"),
        ("drain_seconds", -1, "drain_seconds"),
    ],
    ids=["log-format", "log-level", "proxy-hostname", "client-rate", "repository-rate", "negative-drain"],
)
def test_bad_operations_settings_refuse_to_load(
    tmp_path: Path, issuer: TestIssuer, key: str, value: Any, fragment: str
) -> None:
    """A bad operations setting is a load error naming the [gateway] table and the field."""
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, **{key: value})
    with pytest.raises(ConfigError) as raised:
        config.load(path, {})
    (problem,) = raised.value.problems
    assert f"[gateway] {key}" in problem and fragment in problem


# Client address behind proxies


async def test_forged_forwarded_for_from_untrusted_peer_is_ignored(
    make_gateway: MakeGateway, issuer: TestIssuer, at: At, caplog: pytest.LogCaptureFixture
) -> None:
    """X-Forwarded-For from a peer outside trusted_proxies is ignored: the audit client is the peer."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    trusting = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, trusted_proxies=["10.0.0.0/8"])
    trusting_none = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    forged = [("X-Forwarded-For", "203.0.113.9")]
    assert (await mint(at(trusting, "192.0.2.7"), issuer.gitlab_token(), forged)).status_code == 200
    # With no proxies trusted, even a private peer's header is only a header.
    assert (await mint(at(trusting_none, "10.0.0.5"), issuer.gitlab_token(), forged)).status_code == 200
    assert [line["client"] for line in audit_lines(caplog)] == ["192.0.2.7", "10.0.0.5"]


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ([("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        # The client may send its own X-Forwarded-For; the proxies append, so the nearest untrusted hop is real.
        ([("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 10.0.0.7")], "203.0.113.9"),
        ([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9, 10.1.2.3")], "203.0.113.9"),
        ([("X-Forwarded-For", "10.0.0.9, 10.0.0.7")], "10.0.0.9"),
        ([("X-Forwarded-For", "garbage")], "10.0.0.5"),
        ([("X-Forwarded-For", "198.51.100.1, 203.0.113.9:4711")], "10.0.0.5"),
        ([("X-Forwarded-For", "<script>, 10.0.0.7")], "10.0.0.7"),
        ([("X-Forwarded-For", " , ,")], "10.0.0.5"),
        ([], "10.0.0.5"),
    ],
    ids=[
        "one-hop", "forged-prefix-and-inner-proxy", "two-headers", "all-trusted", "garbage", "address-with-port",
        "garbage-before-proxy", "empty-hops", "no-header",
    ],
)  # fmt: skip
async def test_trusted_proxy_forwarded_for_is_honoured(
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    at: At,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[str, str]],
    client: str,
) -> None:
    """From a trusted proxy, the client is the nearest X-Forwarded-For hop outside trusted_proxies, never garbage."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, trusted_proxies=["10.0.0.0/8"])
    response = await mint(at(gateway, "10.0.0.5"), issuer.gitlab_token(), headers)
    assert response.status_code == 200, response.text
    assert [line["client"] for line in audit_lines(caplog)] == [client]


def scope(peer: tuple[str, int] | None, *forwarded: str) -> dict[str, Any]:
    return {"client": peer, "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        (["10.0.0.0/8"], ("10.2.3.4", 80), ["192.0.2.1"], "192.0.2.1"),
        (["10.0.0.0/8"], ("11.2.3.4", 80), ["192.0.2.1"], "11.2.3.4"),
        (["10.0.0.5"], ("10.0.0.5", 80), ["192.0.2.1"], "192.0.2.1"),
        (["10.0.0.5"], ("10.0.0.6", 80), ["192.0.2.1"], "10.0.0.6"),
        (["fd00::/8"], ("fd00::1", 80), ["2001:db8::1"], "2001:db8::1"),
        (["fd00::/8"], ("fd00::1", 80), ["2001:db8::1, fd12::7"], "2001:db8::1"),
        (["fd00::/8"], ("2001:db8::2", 80), ["192.0.2.1"], "2001:db8::2"),
        (["10.0.0.0/8", "fd00::/8"], ("fd00::1", 80), ["192.0.2.1, 10.9.9.9"], "192.0.2.1"),
        (["10.0.0.0/8"], ("10.0.0.1", 80), ["192.0.2.1", "198.51.100.2"], "198.51.100.2"),
        (["10.0.0.0/8"], ("10.0.0.1", 80), ["2001:db8::zz"], "10.0.0.1"),
        ([], ("10.0.0.1", 80), ["192.0.2.1"], "10.0.0.1"),
        (["10.0.0.0/8"], None, ["192.0.2.1"], None),
    ],
    ids=[
        "v4-cidr", "v4-untrusted-peer", "v4-single-address", "v4-single-address-other-peer", "v6-cidr",
        "v6-inner-proxy", "v6-untrusted-peer", "mixed-families", "last-header-nearest", "bad-v6",
        "nothing-trusted", "no-peer",
    ],
)  # fmt: skip
def test_client_address(
    trusted: list[str], peer: tuple[str, int] | None, forwarded: list[str], expected: str | None
) -> None:
    """client_address picks the peer, or behind trusted proxies the nearest untrusted valid hop."""
    networks = tuple(ip_network(n) for n in trusted)
    assert client_address(scope(peer, *forwarded), networks) == expected


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        pytest.param(["127.0.0.0/8"], ("::ffff:127.0.0.1", 80), ["203.0.113.9"], "203.0.113.9", id="mapped-proxy"),
        pytest.param([], ("::ffff:203.0.113.9", 80), [], "203.0.113.9", id="mapped-peer-untrusted"),
        pytest.param(["127.0.0.0/8"], ("::ffff:203.0.113.9", 80), ["192.0.2.1"], "203.0.113.9", id="mapped-peer"),
        pytest.param(
            ["127.0.0.0/8"], ("127.0.0.1", 80), ["::ffff:203.0.113.9"], "203.0.113.9", id="mapped-forwarded-hop"
        ),
        pytest.param(
            ["127.0.0.0/8"], ("::ffff:127.0.0.1", 80), ["::ffff:127.0.0.2"], "127.0.0.2", id="mapped-trusted-hop"
        ),
        pytest.param([], ("2001:db8::1", 80), [], "2001:db8::1", id="plain-ipv6-unchanged"),
    ],
)
def test_client_address_of_a_dual_stack_listener(
    trusted: list[str], peer: tuple[str, int], forwarded: list[str], expected: str
) -> None:
    """A dual-stack address ::ffff:a.b.c.d counts as a.b.c.d for trusted_proxies and is given back as a.b.c.d."""
    networks = tuple(ip_network(n) for n in trusted)
    assert client_address(scope(peer, *forwarded), networks) == expected


# Rate limits


def retry_after_full_window(clock: FakeClock, amount: int = 3, window: int = 60) -> int:
    """Retry-After for a window that took `amount` requests just now: until it has become the previous window
    and faded enough for one more request to fit the sliding window."""
    elapsed = clock() % window
    return math.ceil(window - elapsed + window - window * (amount - 1) / amount)


async def test_client_rate_limit(make_gateway: MakeGateway, issuer: TestIssuer, at: At, clock: FakeClock) -> None:
    """The 4th request in a minute from one address gets 429 rate-limited with Retry-After; others are unaffected."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="3/minute")
    client = at(gateway, "10.0.0.5")
    for _ in range(3):
        assert (await mint(client, issuer.gitlab_token())).status_code == 200
    held = issuer.gitlab_token()
    response = await mint(client, held)
    assert response.status_code == 429
    assert error_code(response) == "rate-limited"
    assert "retry" in description(response) and held not in response.text
    assert response.headers["retry-after"].isdigit()
    assert abs(int(response.headers["retry-after"]) - retry_after_full_window(clock)) <= 1

    # Another address has its own budget, and the refused token was not spent: it mints from there.
    response = await mint(at(gateway, "10.0.0.6"), held)
    assert response.status_code == 200, response.text
    counts = samples(await metrics(gateway), "gateway_mint_requests_total", "issuer", "outcome")
    assert counts == {("gitlab-com", "success"): 4, ("-", "rate-limited"): 1}


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", b'{"token": "a.b.c"}', b"x" * 20000],
    ids=["not-json", "empty-object", "not-a-jws", "oversize"],
)
async def test_client_rate_limit_counts_before_parsing(
    make_gateway: MakeGateway, issuer: TestIssuer, at: At, body: bytes
) -> None:
    """Bodies refused before any token is parsed still use up the client's budget."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="3/minute")
    client = at(gateway, "10.0.0.7")
    for _ in range(3):
        response = await client.post("/_/oidc/mint-token", content=body)
        assert response.status_code in (413, 422) and error_code(response) == "invalid-payload"
    response = await mint(client, issuer.gitlab_token())
    assert response.status_code == 429 and error_code(response) == "rate-limited"


async def test_client_rate_limit_uses_forwarded_address(make_gateway: MakeGateway, issuer: TestIssuer, at: At) -> None:
    """Behind a trusted proxy each forwarded client has its own budget, and a forged hop cannot escape it."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="2/minute", trusted_proxies=["10.0.0.0/8"]
    )
    proxy = at(gateway, "10.0.0.1")
    for n in range(2):
        # A different forged prefix each time: the proxy-appended hop is what counts.
        headers = [("X-Forwarded-For", f"198.51.100.{n}, 203.0.113.9")]
        assert (await mint(proxy, issuer.gitlab_token(), headers)).status_code == 200
    response = await mint(proxy, issuer.gitlab_token(), [("X-Forwarded-For", "198.51.100.99, 203.0.113.9")])
    assert response.status_code == 429
    response = await mint(proxy, issuer.gitlab_token(), [("X-Forwarded-For", "203.0.113.10")])
    assert response.status_code == 200, response.text


async def test_repository_rate_limit_counts_failures(
    make_gateway: MakeGateway, issuer: TestIssuer, at: At, clock: FakeClock
) -> None:
    """After 3 verified attempts for a repository (failures included), the 4th is 429 from any address."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_repository="3/minute")
    attempts = [
        (issuer.gitlab_token(), 200),
        (issuer.gitlab_token(workflow="release.yml"), 422),
        (issuer.gitlab_token(environment="staging", ref="dev"), 200),
    ]
    for n, (token, status) in enumerate(attempts):
        response = await mint(at(gateway, f"10.0.0.{n + 1}"), token)
        assert response.status_code == status, response.text
    # Another address, and the repository spelled in other case: still the same repository.
    response = await mint(at(gateway, "10.0.0.99"), issuer.gitlab_token(project_path="Group/Project"))
    assert response.status_code == 429 and error_code(response) == "rate-limited"
    assert "group/project" in description(response).lower()
    assert abs(int(response.headers["retry-after"]) - retry_after_full_window(clock)) <= 1

    # Another repository has its own budget (it is refused only for having no publisher).
    response = await mint(at(gateway, "10.0.0.99"), issuer.gitlab_token(project_path="group/other"))
    assert response.status_code == 422 and error_code(response) == "invalid-publisher"


async def test_repository_rate_limit_ignores_unverified_tokens(
    make_gateway: MakeGateway, issuer: TestIssuer, at: At
) -> None:
    """Tokens that fail verification do not use up a repository's budget, so forgeries cannot block its releases."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_repository="2/minute")
    genuine = issuer.gitlab_token()
    for n in range(5):
        forged = with_signature_of(issuer.gitlab_token(), genuine)
        response = await mint(at(gateway, f"192.0.2.{n}"), forged)
        assert response.status_code == 422 and error_code(response) == "invalid-token"
    expired = issuer.gitlab_token(exp=1, iat=0, nbf=0)
    assert error_code(await mint(at(gateway, "192.0.2.9"), expired)) == "invalid-token"
    for token in (genuine, issuer.gitlab_token()):
        response = await mint(at(gateway, "10.0.0.1"), token)
        assert response.status_code == 200, response.text
    assert (await mint(at(gateway, "10.0.0.1"), issuer.gitlab_token())).status_code == 429


async def test_no_limits_configured_means_none(gateway: Gateway, issuer: TestIssuer) -> None:
    """Without rate_limit_* settings, many requests from one address are all answered normally."""
    assert gateway.exchange.limits is None
    for _ in range(20):
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200


@needs_redis
async def test_client_rate_limit_shared_through_redis(
    shared_gateway: MakeGateway, issuer: TestIssuer, at: At, clock: FakeClock
) -> None:
    """With one Redis, 3 requests from one address split over two replicas use the budget; the 4th is 429."""
    replicas = [
        await shared_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="3/minute") for _ in range(2)
    ]
    a, b = (at(replica, "10.0.0.5") for replica in replicas)
    for client in (a, b, a):
        assert (await mint(client, issuer.gitlab_token())).status_code == 200
    response = await mint(b, issuer.gitlab_token())
    assert response.status_code == 429 and error_code(response) == "rate-limited"
    assert abs(int(response.headers["retry-after"]) - retry_after_full_window(clock)) <= 1
    assert (await mint(at(replicas[1], "10.0.0.6"), issuer.gitlab_token())).status_code == 200


@needs_redis
async def test_repository_rate_limit_shared_through_redis(
    shared_gateway: MakeGateway, issuer: TestIssuer, at: At
) -> None:
    """With one Redis, a repository's 3 attempts at two replicas use its budget; the 4th at either is 429."""
    replicas = [
        await shared_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_repository="3/minute") for _ in range(2)
    ]
    for n, replica in enumerate([replicas[0], replicas[1], replicas[0]]):
        assert (await mint(at(replica, f"10.0.0.{n}"), issuer.gitlab_token())).status_code == 200
    response = await mint(at(replicas[1], "10.0.0.50"), issuer.gitlab_token())
    assert response.status_code == 429 and error_code(response) == "rate-limited"


@needs_redis
async def test_rate_limits_without_redis_stay_per_replica(
    make_gateway: MakeGateway, issuer: TestIssuer, at: At
) -> None:
    """Without redis_url each replica counts on its own: 3 requests at each of two replicas all pass."""
    replicas = [
        await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="3/minute") for _ in range(2)
    ]
    for replica in replicas:
        for _ in range(3):
            assert (await mint(at(replica, "10.0.0.5"), issuer.gitlab_token())).status_code == 200
        assert (await mint(at(replica, "10.0.0.5"), issuer.gitlab_token())).status_code == 429


@needs_redis
async def test_rate_limits_fall_back_in_process_when_redis_is_down(
    shared_gateway: MakeGateway, issuer: TestIssuer, at: At, redis_server: RedisServer
) -> None:
    """With Redis dead, requests are still answered (no 500) and the limits are counted in-process."""
    gateway = await shared_gateway(
        {"gitlab-com": gitlab_issuer(issuer)},
        replay_fallback=True,
        rate_limit_client="3/minute",
        rate_limit_repository="5/minute",
    )
    client = at(gateway, "10.0.0.5")
    assert (await mint(client, issuer.gitlab_token())).status_code == 200
    redis_server.stop()
    statuses = [(await mint(client, issuer.gitlab_token())).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    # The repository's budget is counted in-process too: 4 more from other addresses, the 5th over the limit.
    statuses = [(await mint(at(gateway, f"10.1.0.{n}"), issuer.gitlab_token())).status_code for n in range(3)]
    assert statuses == [200, 200, 429]


@needs_redis
async def test_rate_limit_redis_failures_are_counted(
    shared_gateway: MakeGateway, issuer: TestIssuer, at: At, redis_server: RedisServer
) -> None:
    """A rate-limit check that cannot reach Redis counts in gateway_redis_errors_total, like every Redis failure."""
    gateway = await shared_gateway({"gitlab-com": gitlab_issuer(issuer)}, rate_limit_client="1/minute")
    client = at(gateway, "10.0.0.5")
    redis_server.stop()
    # Garbage bodies: refused before the token store is asked, so only the rate limiter talks to Redis.
    assert (await client.post("/_/oidc/mint-token", content=b"x")).status_code == 422
    assert (await client.post("/_/oidc/mint-token", content=b"x")).status_code == 429
    assert samples(await metrics(gateway), "gateway_redis_errors_total")[()] >= 1


@needs_redis
async def test_reload_applies_rate_limits_in_the_stores_redis(
    shared_gateway: MakeGateway, issuer: TestIssuer, at: At, redis_server: RedisServer
) -> None:
    """A reload that sets rate_limit_client applies it at once, counted in the store's Redis for both replicas."""
    replicas = [await shared_gateway({"gitlab-com": gitlab_issuer(issuer)}) for _ in range(2)]
    for replica in replicas:
        assert replica.exchange.limits is None
        path = replica.exchange.settings.config_path
        assert path is not None
        write_config(
            path.parent, {"gitlab-com": gitlab_issuer(issuer)}, (PUBLISHER,),
            redis_url=redis_server.url, rate_limit_client="2/minute",
        )  # fmt: skip
        assert await replica.app.state.reloader.reload() is True
    a, b = (at(replica, "10.0.0.5") for replica in replicas)
    statuses = [(await mint(client, issuer.gitlab_token())).status_code for client in (a, b, a)]
    assert statuses == [200, 200, 429]


def redis_connections(server: RedisServer) -> int:
    """Connections to `server` other than the one asking."""
    with server.client() as inspect:
        return len(inspect.client_list()) - 1


@needs_redis
async def test_shutdown_closes_every_redis_connection(
    tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """When the app shuts down (its lifespan ends) it holds no Redis connection, the rate limiter's included."""
    path = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        (PUBLISHER,),
        redis_url=redis_server.url,
        rate_limit_client="5/minute",
        rate_limit_repository="5/minute",
        reload_interval=0,
    )
    app = create_app(config.load(path, {}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://gateway.test") as client:
            response = await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})
            assert response.status_code == 200, response.text
        assert redis_connections(redis_server) > 0
    # Another process (redis-server) notices closed sockets on its own schedule: poll it, briefly.
    deadline = time.monotonic() + 2
    while redis_connections(redis_server) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert redis_connections(redis_server) == 0


# Health


async def test_readyz_does_not_depend_on_the_issuer(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """With the issuer answering 500, /readyz and /livez stay 200 before and after mints fail for it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    issuer.status = 500
    assert (await gateway.client.get("/readyz")).status_code == 200
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 503 and error_code(response) == "issuer-unavailable"
    clock.advance(FAILURE_BACKOFF + 1)
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 503
    requests = len(issuer.requests)
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert (await gateway.client.get("/livez")).status_code == 200
    # Readiness asked the issuer nothing.
    assert len(issuer.requests) == requests


async def test_readyz_503_while_shutting_down(gateway: Gateway, issuer: TestIssuer) -> None:
    """Once the endpoints are shutting down, /readyz says 503 with the reason while mints are still answered."""
    gateway.app.state.endpoints.shutting_down = True
    response = await gateway.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unready", "problems": ["shutting down"]}
    assert (await gateway.client.get("/livez")).status_code == 200
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
