"""`gateway explain`: verification without spending, the identity, ignored claims, and publishers field by field.

Tokens are real, signed by the HTTPS TestIssuer; `explain` builds the app's own Exchange from real config files.
Where a test must show that the jti was not spent, explain shares the gateway's store and the same token is then
minted over HTTP. Time is the FakeClock the gateway uses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.__main__ import main
from gateway.errors import InvalidToken
from gateway.explain import explain
from gateway.identity import FIELDS, Identity
from gateway.issuers import KINDS, Kind
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, Gateway, error_code, gitlab_issuer, write_config

MakeGateway = Callable[..., Any]
BOUND = PUBLISHER | {"environment": "release", "projects": ["releaseproject"]}


def token_for(issuer: TestIssuer, clock: FakeClock, **overrides: Any) -> str:
    return issuer.gitlab_token(now=int(clock()), **overrides)


async def explain_with(gateway: Gateway, token: str, clock: FakeClock) -> tuple[int, str]:
    """Explain against the gateway's own settings, clock and store (so a spent jti would show when minting)."""
    return await explain(gateway.exchange.settings, token, clock=clock, store=gateway.exchange.store)


def assert_token_not_shown(token: str, text: str) -> None:
    assert token not in text
    for segment in token.split("."):
        assert segment not in text


async def test_a_matching_token_is_explained_and_exits_0(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A matching token prints its issuer, a passed verification, every identity field and the winning publisher."""
    token = token_for(issuer, clock)
    code, text = await explain_with(gateway, token, clock)
    assert code == 0, text
    assert f"issuer: gitlab-com ({issuer.url}, kind gitlab)" in text
    # The token's exp is its whole-second iat + 300; the FakeClock's now has a fraction.
    remaining = round(int(clock()) + 300 - clock())
    assert f"verification: ok (kid {issuer.signing_kid!r}; expires in {remaining} s)" in text
    identity = gateway.exchange.settings.issuers["gitlab-com"]
    expected = {"issuer": "'gitlab-com'", "issuer_url": repr(identity.url), "kind": "'gitlab'"}
    expected |= {"repository": "'group/project'", "workflow": "'.gitlab-ci.yml'", "environment": "none"}
    expected |= {"owner_id": "'12885807'", "protected_ref": "true", "run_id": "'1873420561'"}
    shown = dict(re.findall(r"^  (\w+) +(.+)$", text.split("identity:\n")[1], re.MULTILINE))
    assert set(FIELDS) <= set(shown)
    assert {name: shown[name] for name in expected} == expected
    assert "    workflow     match ('.gitlab-ci.yml')" in text
    assert "result: matched by [[publisher]] #1 (workflow '.gitlab-ci.yml'); mint-token would grant projects " in text
    assert text.splitlines()[-2].endswith("grant projects sampleproject")
    assert_token_not_shown(token, text)


async def test_a_near_miss_shows_the_differing_field_with_both_values(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token from another CI config file shows MISMATCH with the expected and the token's workflow, and exits 1."""
    token = token_for(issuer, clock, workflow="ci/release.yml")
    code, text = await explain_with(gateway, token, clock)
    assert code == 1
    assert "  [[publisher]] #1 (workflow '.gitlab-ci.yml'): projects sampleproject  <- nearest miss" in text
    assert "    workflow     MISMATCH expected '.gitlab-ci.yml', token has 'ci/release.yml'" in text
    assert "    environment  match (the publisher accepts any; token has none)" in text
    assert "result: no publisher matches; mint-token would refuse with invalid-publisher: " in text
    assert "nearest: workflow expected '.gitlab-ci.yml', token has 'ci/release.yml'" in text
    assert_token_not_shown(token, text)


@pytest.mark.parametrize(
    ("environment", "code", "winner", "projects", "bound_line"),
    [
        pytest.param(
            "release", 0, "#2", "releaseproject", "    environment  match ('release')", id="bound-beats-unbound"
        ),
        pytest.param(
            "staging", 0, "#1", "sampleproject",
            "    environment  MISMATCH expected 'release', token has 'staging'", id="other-environment-unbound-wins",
        ),
        pytest.param(
            None, 0, "#1", "sampleproject",
            "    environment  MISMATCH expected 'release', token has none", id="no-environment-unbound-wins",
        ),
        pytest.param(
            "Release", 0, "#1", "sampleproject",
            "    environment  MISMATCH expected 'release', token has 'Release'", id="gitlab-environment-case-sensitive",
        ),
    ],
)  # fmt: skip
async def test_environment_bound_and_unbound_candidates(
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    clock: FakeClock,
    environment: str | None,
    code: int,
    winner: str,
    projects: str,
    bound_line: str,
) -> None:
    """Both candidates are compared; a matching environment-bound publisher wins over the unbound one, as in minting."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, BOUND])
    token = token_for(issuer, clock, environment=environment)
    result, text = await explain_with(gateway, token, clock)
    assert result == code, text
    assert "publishers for repository 'group/project' of issuer 'gitlab-com': 2" in text
    bound = text.split("[[publisher]] #2 (workflow '.gitlab-ci.yml', environment 'release'): projects releaseproject")
    assert bound_line in bound[1].split("  [[publisher]]")[0]
    assert f"result: matched by [[publisher]] {winner} " in text
    assert text.splitlines()[-2 if winner == "#1" else -3].endswith(f"grant projects {projects}")
    if winner == "#2":
        assert "also matching but not bound to an environment: [[publisher]] #1 (workflow '.gitlab-ci.yml')" in text
    # What explain promised is what minting grants.
    minted = await gateway.mint(token)
    assert minted.status_code == 200, minted.text
    assert minted.json()["projects"] == [projects]


def expired_token(issuer: TestIssuer, other: TestIssuer, clock: FakeClock) -> str:
    token = token_for(issuer, clock)
    clock.advance(3600)
    return token


@pytest.mark.parametrize(
    ("make_token", "code", "fragment"),
    [
        pytest.param(expired_token, "invalid-token", "token expired at", id="expired"),
        pytest.param(
            lambda i, o, c: token_for(i, c, aud="warehouse"), "invalid-token", "'aud' is 'warehouse'", id="aud"
        ),
        pytest.param(
            lambda i, o, c: i.sign(i.gitlab_claims(now=int(c())), header={"alg": "RS512"}),
            "invalid-token", "algorithm 'RS512' is not accepted", id="algorithm",
        ),
        pytest.param(
            lambda i, o, c: o.gitlab_token(now=int(c())), "invalid-payload", "is not trusted by this gateway",
            id="untrusted-issuer",
        ),
        pytest.param(lambda i, o, c: "not-a-token", "invalid-payload", "not a compact JWS", id="not-a-jws"),
    ],
)  # fmt: skip
async def test_an_invalid_token_shows_the_error_code_and_exits_1(
    gateway: Gateway,
    issuer: TestIssuer,
    other_issuer: TestIssuer,
    clock: FakeClock,
    make_token: Callable[[TestIssuer, TestIssuer, FakeClock], str],
    code: str,
    fragment: str,
) -> None:
    """A token mint-token would refuse shows the same error code and description, no identity, and exits 1."""
    token = make_token(issuer, other_issuer, clock)
    result, text = await explain_with(gateway, token, clock)
    assert result == 1
    failure = [line for line in text.splitlines() if line.startswith("verification: ")]
    assert failure[0].startswith(f"verification: FAILED {code}: ")
    assert fragment in failure[0]
    assert "identity:" not in text
    assert_token_not_shown(token, text)
    minted = await gateway.mint(token)
    assert error_code(minted) == code


async def test_an_unreachable_issuer_shows_the_upstream_reason(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """When the issuer's keys cannot be fetched, explain shows issuer-unavailable and the upstream failure."""
    issuer.status = 500
    issuer.paths_misbehave = {"jwks"}
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 1
    assert "verification: FAILED issuer-unavailable: " in text
    assert "  upstream: " in text
    assert "answered HTTP 500" in text


async def test_a_policy_refusal_shows_the_policy_reason(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token the issuer's policy refuses (only self-hosted runners) shows invalid-publisher with the reason."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, runner_environments=["self-hosted"])})
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 1
    assert "verification: FAILED invalid-publisher: the job ran on a 'gitlab-hosted' runner" in text


async def test_explain_does_not_spend_the_jti(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """Explaining a token twice, with the gateway's own store, leaves its jti unspent: it still mints once, then not."""
    token = token_for(issuer, clock)
    assert (await explain_with(gateway, token, clock))[0] == 0
    assert (await explain_with(gateway, token, clock))[0] == 0
    first = await gateway.mint(token)
    assert first.status_code == 200, first.text
    # The store really remembers spends: the same token is refused the second time.
    assert error_code(await gateway.mint(token)) == "invalid-reuse-token"


async def test_ignored_claims_are_listed_by_name_only(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """Claims the gitlab kind does not know are listed by name, never by value; known claims are not listed."""
    token = token_for(issuer, clock, build_flavour="value-that-must-not-show", zz_extra=7)
    code, text = await explain_with(gateway, token, clock)
    assert code == 0, text
    assert "ignored claims (unknown to the gitlab kind): build_flavour, zz_extra\n" in text
    assert "value-that-must-not-show" not in text
    plain = await explain_with(gateway, token_for(issuer, clock), clock)
    assert "ignored claims (unknown to the gitlab kind): none\n" in plain[1]


async def test_owner_id_is_shown_and_compared_when_pinned(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A publisher pinned to another owner shows an owner_id MISMATCH, exits 1, and the token's owner id is not
    proposed as a pin."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"owner_id": "999"}])
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 1
    assert "    owner_id     MISMATCH expected '999', token has '12885807'" in text
    advice = next(line for line in text.splitlines() if line.startswith("owner_id to pin:"))
    assert advice.startswith("owner_id to pin: none proposed: [[publisher]] #1 (workflow '.gitlab-ci.yml') pins '999'")
    assert 'owner_id = "12885807"' not in text


async def test_owner_id_is_proposed_when_no_publisher_pins_one(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """Without any pinned candidate, the token's owner id is proposed as the pin, in publishers.toml syntax."""
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 0
    assert 'owner_id to pin: 12885807 (owner_id = "12885807" in a publisher ' in text


async def test_an_equal_owner_id_pin_is_reported_as_already_pinned(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A candidate pinned to the token's own owner id is reported as already pinned, not proposed again."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"owner_id": "12885807"}])
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 0
    assert "owner_id to pin: already pinned to '12885807', which this token's owner id equals" in text


async def test_repository_id_is_shown_and_compared_when_pinned(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """The repository_id to pin is printed, but never over a publisher pinned to another project id, which shows a
    MISMATCH (exit 1)."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 0
    assert 'repository_id to pin: 61254376 (repository_id = "61254376" in a publisher ' in text
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"repository_id": "7"}])
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 1
    assert "repository_id to pin: none proposed: [[publisher]] #1 (workflow '.gitlab-ci.yml') pins '7'" in text
    assert "    repository_id MISMATCH expected '7', token has '61254376'" in text


async def test_no_candidate_publisher_is_said_plainly(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token whose repository has no publisher shows zero candidates and the registration hint, and exits 1."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"repository": "group/other"}])
    code, text = await explain_with(gateway, token_for(issuer, clock), clock)
    assert code == 1
    assert "publishers for repository 'group/project' of issuer 'gitlab-com': 0" in text
    assert "no publisher is registered for repository 'group/project'" in text
    assert "[[publisher]] #" not in text


# --- any kind, through the KINDS registry -----------------------------------------------------------------------


def ci_identity(issuer: config.Issuer, claims: Mapping[str, Any]) -> Identity:
    """A minimal kind: repository from `repo`, workflow from `pipeline`, environment from `stage`."""
    if not isinstance(claims.get("repo"), str) or not isinstance(claims.get("pipeline"), str):
        raise InvalidToken("token needs 'repo' and 'pipeline' strings")
    return Identity(
        issuer=issuer.name,
        issuer_url=issuer.url,
        kind="ci",
        repository=claims["repo"],
        workflow=claims["pipeline"],
        environment=claims.get("stage"),
        owner_id=claims.get("org_id"),
    )


CI_KIND = Kind(
    name="ci",
    identity=ci_identity,
    environment_case_sensitive=False,
    known_claims=lambda issuer: frozenset({"iss", "aud", "exp", "iat", "jti", "repo", "pipeline", "stage", "org_id"}),
)


async def test_explain_works_for_any_registered_kind(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kind added to KINDS is explained with its own identity, known claims and environment case rule."""
    monkeypatch.setitem(KINDS, "ci", CI_KIND)
    publisher = {"issuer": "buildbot", "repository": "org/app", "workflow": "deploy", "environment": "Prod"}
    gateway = await make_gateway(
        {"buildbot": {"url": issuer.url, "kind": "ci", "ca_bundle": str(issuer.ca_path)}},
        [publisher | {"projects": ["app"]}],
    )
    now = int(clock())
    claims = {"iss": issuer.url, "aud": "pypi", "iat": now, "exp": now + 300, "jti": "j-1", "repo": "org/app"}
    claims |= {"pipeline": "deploy", "stage": "prod", "org_id": "42", "runner": "r-7"}
    code, text = await explain_with(gateway, issuer.sign(claims), clock)
    assert code == 0, text
    assert f"issuer: buildbot ({issuer.url}, kind ci)" in text
    assert "ignored claims (unknown to the ci kind): runner\n" in text
    assert "    environment  match ('prod')" in text
    assert "owner_id to pin: 42 " in text
    assert "mint-token would grant projects app" in text


async def test_explain_uses_the_github_kind_rules(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A GitHub token is explained with the github kind: workflow file name, case-insensitive environment, owner id."""
    github = {"url": issuer.url, "kind": "github", "ca_bundle": str(issuer.ca_path)}
    publisher = {"issuer": "github-com", "repository": "octo-org/sample-kit", "workflow": "release.yml"}
    gateway = await make_gateway({"github-com": github}, [publisher | {"environment": "pypi", "projects": ["kit"]}])
    claims = issuer.github_claims(environment="PyPI", now=int(clock()))
    code, text = await explain_with(gateway, issuer.sign(claims), clock)
    assert code == 0, text
    assert f"issuer: github-com ({issuer.url}, kind github)" in text
    assert "    workflow     match ('release.yml')" in text
    assert "    environment  match ('PyPI')" in text
    assert f"owner_id to pin: {claims['repository_owner_id']} " in text
    assert "ignored claims (unknown to the github kind): none\n" in text


# --- the command ------------------------------------------------------------------------------------------------


def config_file(directory: Path, issuer: TestIssuer, publishers: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, publishers)


def test_command_reads_the_token_from_stdin(issuer: TestIssuer, tmp_path: Path) -> None:
    """`gateway explain --config PATH -`, run as a process, reads the token from stdin, explains it and exits 0."""
    path = config_file(tmp_path, issuer, [PUBLISHER])
    token = issuer.gitlab_token()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "explain", "--config", str(path), "-"],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  repository          'group/project'" in result.stdout
    assert "mint-token would grant projects sampleproject" in result.stdout
    assert_token_not_shown(token, result.stdout + result.stderr)


def test_command_takes_the_token_as_an_argument_and_exits_1_on_a_miss(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway explain --config PATH TOKEN` exits 1 when no publisher matches, showing the mismatch."""
    path = config_file(tmp_path, issuer, [PUBLISHER | {"workflow": "ci/publish.yml"}])
    token = issuer.gitlab_token()
    assert main(["explain", "--config", str(path), token]) == 1
    out = capsys.readouterr().out
    assert "    workflow     MISMATCH expected 'ci/publish.yml', token has '.gitlab-ci.yml'" in out
    assert_token_not_shown(token, out)


def test_command_reports_a_bad_config_and_exits_1(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config with problems is reported line by line on stderr, and nothing is explained."""
    path = config_file(tmp_path, issuer, [PUBLISHER | {"issuer": "nowhere"}])
    assert main(["explain", "--config", str(path), issuer.gitlab_token()]) == 1
    captured = capsys.readouterr()
    assert "publishers.toml: [[publisher]] #1 issuer: names no issuer in [issuers] (got 'nowhere')" in captured.err
    assert captured.out == ""


def test_command_runs_without_the_upstream_password(
    issuer: TestIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain works on a config whose [upstream] password variable is unset (it never uploads); check refuses it."""
    path = config_file(tmp_path, issuer, [PUBLISHER])
    with path.open("a") as file:
        file.write('\n[upstream]\nurl = "https://index.test"\nusername = "gateway"\npassword_env = "UNSET_PASSWORD"\n')
    monkeypatch.delenv("UNSET_PASSWORD", raising=False)
    assert main(["explain", "--config", str(path), issuer.gitlab_token()]) == 0
    assert "mint-token would grant projects sampleproject" in capsys.readouterr().out
    assert main(["check", "--config", str(path)]) == 1
    assert "$UNSET_PASSWORD is not set" in capsys.readouterr().err
