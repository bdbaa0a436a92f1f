"""`gateway probe-issuer`: every discovery and key rule, against the real HTTPS TestIssuer behaving well and badly.

The probe fetches with the gateway's own Fetcher, so the misbehaviours are the ones tests/test_keys.py shows the
gateway refusing; here each must fail the rule that names it, with the evidence an operator needs. Only the
deadline tests measure wall time (a real socket is slow on purpose there), with small timeouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.__main__ import main
from gateway.probe import FAIL, PASS, RULES, SKIP, Report, probe
from gateway.testing import DELETE, TestIssuer, free_port, oct_jwk, weak_rsa_jwk

KiB = 1024
Knobs = Callable[[TestIssuer], None]


@pytest.fixture
def other(other_issuer: TestIssuer) -> Iterator[TestIssuer]:
    """The second issuer, standing for another origin, with knobs and counters reset around each test."""
    other_issuer.reset()
    yield other_issuer
    other_issuer.reset()


async def probe_issuer(issuer: TestIssuer, **options: Any) -> Report:
    return await probe(issuer.url, ca_bundle=issuer.ca_path, **options)


def failing(report: Report) -> set[str]:
    return {rule.id for rule in report.rules if rule.status == FAIL}


def evidence(report: Report, rule_id: str) -> str:
    return "\n".join(report.rule(rule_id).evidence)


async def test_a_well_behaved_issuer_passes_every_rule(issuer: TestIssuer) -> None:
    """Against a well-behaved issuer every rule passes, one PASS line each, with its issuer, jwks_uri and key."""
    report = await probe_issuer(issuer)
    assert report.ok
    assert [rule.id for rule in report.rules] == list(RULES)
    text = report.render()
    rule_lines = [line for line in text.splitlines() if not line.startswith(" ")][:-1]
    assert rule_lines == [f"PASS  {rule.name}" for rule in report.rules]
    assert f"PASS  discovery issuer equals {issuer.url}\n" in text
    assert f"issuer: {issuer.url!r}" in text
    assert f"jwks_uri: '{issuer.url}/oauth/discovery/keys'" in text
    assert f"kid {issuer.signing_kid!r}: RSA, 2048 bits, alg RS256, use sig: accepted" in text
    assert "advertised: RS256" in text
    assert text.endswith(f"ok: all {len(RULES)} rules hold; the gateway can use {issuer.url} as an issuer\n")


async def test_an_issuer_under_a_path_passes(other: TestIssuer) -> None:
    """A self-hosted issuer served under a path (https://host/gitlab) passes, its discovery fetched under that path."""
    report = await probe_issuer(other)
    assert report.ok, report.render()
    assert f"GET {other.url}/.well-known/openid-configuration" in evidence(report, "discovery")
    assert other.url.endswith("/gitlab")


async def test_fetch_evidence_gives_status_size_and_limits(issuer: TestIssuer) -> None:
    """Each fetch rule names the URL, the HTTP status, the bytes read and the cap and deadline it was held to."""
    report = await probe_issuer(issuer, fetch_timeout=2.5, fetch_max_bytes=64 * KiB)
    discovery = len(json.dumps(issuer.discovery(), separators=(",", ":")).encode())
    jwks = len(json.dumps(issuer.jwks(), separators=(",", ":")).encode())
    limits = "no redirect, at most 65536 bytes, within the 2.5 s deadline"
    assert report.rule("discovery").name == f"discovery fetched ({limits})"
    assert f"GET {issuer.url}/.well-known/openid-configuration" in evidence(report, "discovery")
    assert f"HTTP 200, {discovery} bytes (Content-Length {discovery})," in evidence(report, "discovery")
    assert f"GET {issuer.url}/oauth/discovery/keys" in evidence(report, "jwks")
    assert f"HTTP 200, {jwks} bytes (Content-Length {jwks})," in evidence(report, "jwks")


def private_jwk(issuer: TestIssuer) -> dict[str, Any]:
    kid = issuer.add_key(publish=False)
    return dict(issuer.private_key(kid).as_dict(private=True))


def set_knobs(**knobs: Any) -> Knobs:
    def apply(issuer: TestIssuer) -> None:
        for name, value in knobs.items():
            setattr(issuer, name, value(issuer) if callable(value) else value)

    return apply


# (knobs, options, failing rules, rule whose evidence says why, fragment of that evidence)
MISBEHAVIOURS = [
    pytest.param(
        set_knobs(discovery_overrides={"issuer": "https://gitlab.example.com"}),
        {}, {"issuer"}, "issuer", "issuer: 'https://gitlab.example.com'; tokens' iss and the configured url must be",
        id="issuer-mismatch",
    ),
    pytest.param(
        set_knobs(discovery_overrides=lambda i: {"issuer": i.url + "/"}),
        {}, {"issuer"}, "issuer", "/'; tokens' iss",
        id="issuer-trailing-slash",
    ),
    pytest.param(
        set_knobs(discovery_overrides={"jwks_uri": f"https://127.0.0.1:{free_port()}/oauth/discovery/keys"}),
        {}, {"jwks_uri"}, "jwks_uri", "is not on the origin (scheme, host, port) of the issuer; not fetched",
        id="jwks-uri-other-port",
    ),
    pytest.param(
        set_knobs(discovery_overrides=lambda i: {"jwks_uri": f"http://{i.host}/oauth/discovery/keys"}),
        {}, {"jwks_uri"}, "jwks_uri", "is not an https URL",
        id="jwks-uri-http",
    ),
    pytest.param(
        set_knobs(discovery_overrides={"jwks_uri": DELETE}),
        {}, {"jwks_uri"}, "jwks_uri", "jwks_uri: None is not an https URL",
        id="jwks-uri-missing",
    ),
    pytest.param(
        set_knobs(redirect_to="https://elsewhere.example/.well-known/openid-configuration"),
        {}, {"discovery"}, "discovery", "redirects (302); redirects are not followed",
        id="discovery-redirect",
    ),
    pytest.param(
        set_knobs(redirect_to="https://elsewhere.example/keys", status=307, paths_misbehave={"jwks"}),
        {}, {"jwks"}, "jwks", "redirects (307); redirects are not followed",
        id="jwks-redirect",
    ),
    pytest.param(
        set_knobs(oversize=256 * KiB + 1, paths_misbehave={"discovery"}),
        {}, {"discovery"}, "discovery", "is larger than 262144 bytes",
        id="discovery-over-default-cap",
    ),
    pytest.param(
        set_knobs(oversize=2 * KiB + 1, paths_misbehave={"jwks"}),
        {"fetch_max_bytes": 2 * KiB}, {"jwks"}, "jwks", "is larger than 2048 bytes",
        id="jwks-over-given-cap",
    ),
    pytest.param(
        set_knobs(trickle=0.01, paths_misbehave={"discovery"}),
        {"fetch_timeout": 0.3}, {"discovery"}, "discovery", "took longer than 0.3 s",
        id="discovery-trickle",
    ),
    pytest.param(
        set_knobs(trickle=0.01, paths_misbehave={"jwks"}),
        {"fetch_timeout": 0.3}, {"jwks"}, "jwks", "took longer than 0.3 s",
        id="jwks-trickle",
    ),
    pytest.param(
        set_knobs(status=500, paths_misbehave={"discovery"}),
        {}, {"discovery"}, "discovery", "HTTP 500",
        id="discovery-500",
    ),
    pytest.param(
        set_knobs(discovery_override=["issuer"]),
        {}, {"discovery"}, "discovery", "the document is not a JSON object",
        id="discovery-not-an-object",
    ),
    pytest.param(
        set_knobs(jwks_override=b"<html>sign in</html>"),
        {}, {"jwks"}, "jwks", "is not valid JSON",
        id="jwks-not-json",
    ),
    pytest.param(
        set_knobs(jwks_override={"keys": {}}),
        {}, {"jwks"}, "jwks", "JWKS is not an object with a 'keys' list",
        id="jwks-keys-not-a-list",
    ),
    pytest.param(
        set_knobs(extra_jwks=[weak_rsa_jwk(1024, kid="weak")]),
        {}, {"keys"}, "keys", "kid 'weak': RSA, 1024 bits, alg RS256, use sig: dropped, RSA key of 1024 bits is weaker",
        id="weak-rsa-key-beside-a-good-one",
    ),
    pytest.param(
        set_knobs(extra_jwks=[oct_jwk(kid="shared")]),
        {}, {"keys"}, "keys", "kid 'shared': oct, alg HS256, no use: dropped, symmetric (oct) keys are never accepted",
        id="oct-key-beside-a-good-one",
    ),
    pytest.param(
        set_knobs(extra_jwks=lambda i: [private_jwk(i)]),
        {}, {"keys"}, "keys", "dropped, carries private key members",
        id="private-key-published",
    ),
    pytest.param(
        set_knobs(extra_jwks=lambda i: [i.jwks()["keys"][0]]),
        {}, {"kids", "keys", "usable"}, "kids", "appears 2 times; the gateway drops every key under it",
        id="duplicate-kid",
    ),
    pytest.param(
        set_knobs(jwks_override={"keys": []}),
        {}, {"usable"}, "usable", "no key the gateway could verify with",
        id="empty-set",
    ),
    pytest.param(
        set_knobs(jwks_override={"keys": [weak_rsa_jwk(1024, kid="weak")]}),
        {}, {"keys", "usable"}, "usable", "no key the gateway could verify with",
        id="only-a-weak-key",
    ),
    pytest.param(
        set_knobs(discovery_overrides={"id_token_signing_alg_values_supported": ["ES256"]}),
        {}, {"algorithms"}, "algorithms", "advertised: ES256",
        id="rs256-not-advertised",
    ),
    pytest.param(
        set_knobs(),
        {"algorithms": ("ES256",)}, {"algorithms", "keys", "usable"}, "keys", "dropped, alg 'RS256' is not among ES256",
        id="keys-do-not-fit-the-configured-algorithm",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("knobs", "options", "failed", "rule_id", "fragment"), MISBEHAVIOURS)
async def test_a_misbehaving_issuer_fails_the_rule_that_names_it(
    issuer: TestIssuer, knobs: Knobs, options: dict[str, Any], failed: set[str], rule_id: str, fragment: str
) -> None:
    """Each misbehaviour fails exactly its rule(s), printed as FAIL lines with evidence, and the issuer is refused."""
    knobs(issuer)
    report = await probe_issuer(issuer, **options)
    assert not report.ok
    assert failing(report) == failed
    assert fragment in evidence(report, rule_id)
    text = report.render()
    for rule in report.rules:
        if rule.status == FAIL:
            assert f"FAIL  {rule.name}\n" in text
    assert text.splitlines()[-1].startswith(f"refused: {len(failed)} of {len(RULES)} rules fail")


async def test_a_refused_jwks_uri_is_never_fetched(issuer: TestIssuer, other: TestIssuer) -> None:
    """A jwks_uri on another origin fails its rule and is not contacted, even though it serves good keys."""
    other.jwks_override = issuer.jwks()
    issuer.discovery_overrides = {"jwks_uri": f"https://{other.host}{other.jwks_path}"}
    report = await probe_issuer(issuer)
    assert failing(report) == {"jwks_uri"}
    assert [report.rule(r).status for r in ("jwks", "kids", "keys", "usable")] == [SKIP] * 4
    assert other.requests == []
    assert issuer.jwks_count == 0


async def test_a_redirect_target_is_never_contacted(issuer: TestIssuer, other: TestIssuer) -> None:
    """A redirecting discovery URL fails, and the redirect's target, which would have answered well, hears nothing."""
    other.discovery_override = issuer.discovery()
    issuer.redirect_to = f"https://{other.host}{other.discovery_path}"
    report = await probe_issuer(issuer)
    assert failing(report) == {"discovery"}
    assert "HTTP 302" in evidence(report, "discovery")
    assert other.requests == []


async def test_discovery_and_jwks_share_one_deadline(issuer: TestIssuer) -> None:
    """Two fetches that each fit the timeout but not together fail the JWKS rule, as the gateway's one deadline does."""
    # Each answer waits 0.5 s: discovery fits the 0.8 s deadline with room for the TLS handshake, both cannot.
    issuer.delay = 0.5
    report = await probe_issuer(issuer, fetch_timeout=0.8)
    assert report.rule("discovery").status == PASS
    assert failing(report) == {"jwks"}
    assert "took longer than 0.8 s" in evidence(report, "jwks")


async def test_an_unadvertised_algorithm_list_is_a_note_not_a_failure(issuer: TestIssuer) -> None:
    """A discovery document without id_token_signing_alg_values_supported passes that rule with a note."""
    issuer.discovery_overrides = {"id_token_signing_alg_values_supported": DELETE}
    report = await probe_issuer(issuer)
    assert report.ok
    assert "not advertised (got None); the gateway does not need it" in evidence(report, "algorithms")


async def test_an_untrusted_certificate_fails_discovery_with_a_ca_bundle_hint(issuer: TestIssuer) -> None:
    """Without --ca-bundle the test issuer's private CA is not trusted, and the failure says to pass one."""
    report = await probe(issuer.url)
    assert failing(report) == {"discovery"}
    assert "CERTIFICATE_VERIFY_FAILED" in evidence(report, "discovery")
    assert "needs --ca-bundle" in evidence(report, "discovery")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://{host}", id="http"),
        pytest.param("https://{host}?tenant=1", id="query"),
        pytest.param("https://{host}#frag", id="fragment"),
        pytest.param("https://user@{host}", id="credentials"),
        pytest.param("{host}", id="no-scheme"),
    ],
)
async def test_a_url_the_gateway_cannot_trust_fails_without_any_request(issuer: TestIssuer, url: str) -> None:
    """A non-https URL or one with query, fragment or credentials fails the first rule and sends no request."""
    report = await probe(url.format(host=issuer.host), ca_bundle=issuer.ca_path)
    assert failing(report) == {"url"}
    assert all(rule.status == SKIP for rule in report.rules[1:])
    assert "no request was sent" in evidence(report, "url")
    assert "refused: 1 of 9 rules fail and 8 could not be checked" in report.render()
    assert issuer.requests == []


# --- the command ------------------------------------------------------------------------------------------------


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "probe-issuer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_command_exits_0_when_every_rule_holds(issuer: TestIssuer) -> None:
    """`gateway probe-issuer URL --ca-bundle PEM`, run as a process, prints a PASS line per rule and exits 0."""
    result = probe_cli(issuer.url, "--ca-bundle", str(issuer.ca_path))
    assert result.returncode == 0, result.stdout + result.stderr
    rule_lines = [line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(rule_lines) == len(RULES)
    assert all(line.startswith("PASS  ") for line in rule_lines)
    assert f"PASS  discovery issuer equals {issuer.url}" in rule_lines
    assert result.stdout.splitlines()[-1].startswith("ok: all 9 rules hold")


def test_command_exits_1_when_a_rule_fails(issuer: TestIssuer) -> None:
    """The command exits 1 and names the failing rule when the discovery issuer differs from the URL."""
    issuer.discovery_overrides = {"issuer": "https://gitlab.example.com"}
    result = probe_cli(issuer.url, "--ca-bundle", str(issuer.ca_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL  discovery issuer equals {issuer.url}" in result.stdout.splitlines()
    assert f"(discovery issuer equals {issuer.url})" in result.stdout


def test_command_passes_algorithms_timeout_and_cap(issuer: TestIssuer, capsys: pytest.CaptureFixture[str]) -> None:
    """--algorithm, --timeout and --max-bytes reach the rules: a 1 KiB cap fails discovery, named with its limits."""
    code = main(
        ["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--algorithm", "PS256",
         "--algorithm", "RS256", "--timeout", "3", "--max-bytes", "1024"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS  discovery fetched (no redirect, at most 1024 bytes, within the 3 s deadline)" in out
    assert "PASS  discovery id_token_signing_alg_values_supported includes PS256 or RS256" in out
    issuer.oversize = 1025
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--max-bytes", "1024"]) == 1
    assert "is larger than 1024 bytes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(None, "cannot use the CA bundle", id="missing-file"),
        pytest.param("not a certificate\n", "cannot use the CA bundle", id="not-pem"),
    ],
)
def test_command_refuses_an_unusable_ca_bundle_with_exit_2(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, fragment: str
) -> None:
    """An unreadable or non-PEM --ca-bundle is a usage error (exit 2) before any request, not a failed rule."""
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(bundle)]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err
    assert captured.out == ""
    assert issuer.requests == []
