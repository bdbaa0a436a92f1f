from __future__ import annotations

from typing import Any

import pytest

from gateway.testing import DELETE, FakeClock, TestIssuer
from tests.conftest import PUBLISHER, description, error_code, gitlab_issuer


async def test_suspended_issuer_mints_nothing_and_fetches_nothing(make_gateway: Any, issuer: TestIssuer) -> None:
    """An issuer with `enabled = false` keeps loading but its tokens are refused without any network I/O."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, enabled=False)})
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 422
    assert error_code(response) == "invalid-payload"
    assert "suspended" in description(response)
    assert issuer.requests == []


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        pytest.param({"ref_protected": "true"}, True, id="protected"),
        pytest.param({"ref_protected": "false"}, False, id="unprotected"),
    ],
)
async def test_require_protected_ref(
    make_gateway: Any, issuer: TestIssuer, claims: dict[str, Any], allowed: bool
) -> None:
    """With `require_protected_ref`, only jobs on protected refs mint; others are told to protect the ref."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, require_protected_ref=True)})
    response = await gateway.mint(issuer.gitlab_token(**claims))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422
        assert error_code(response) == "invalid-publisher"
        assert "not protected" in description(response)


async def test_require_protected_ref_refuses_a_token_that_does_not_say(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token without `ref_protected` cannot prove its ref is protected, so the policy refuses it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, require_protected_ref=True)})
    response = await gateway.mint(issuer.gitlab_token(ref_protected=None))
    assert error_code(response) == "invalid-publisher"


@pytest.mark.parametrize(
    ("runner", "allowed"),
    [
        pytest.param("gitlab-hosted", True, id="hosted"),
        pytest.param("self-hosted", False, id="self-hosted"),
    ],
)
async def test_runner_environments(make_gateway: Any, issuer: TestIssuer, runner: str, allowed: bool) -> None:
    """`runner_environments` admits only jobs on the listed kinds of runner."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, runner_environments=["gitlab-hosted"])})
    response = await gateway.mint(issuer.gitlab_token(runner_environment=runner))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert error_code(response) == "invalid-publisher"
        assert "self-hosted" in description(response)


# --- publisher refs, max_token_age, deny, require_protected_environment (issue 11, item 3) ---------------------


@pytest.mark.parametrize(
    ("refs", "claims", "allowed"),
    [
        pytest.param(["refs/tags/v*"], {"ref": "v1.2", "ref_type": "tag"}, True, id="tag-matches"),
        pytest.param(["refs/tags/v*"], {"ref": "main", "ref_type": "branch"}, False, id="branch-refused"),
        # `*` stops at a path segment: a tag named v1/evil is not v*.
        pytest.param(["refs/tags/v*"], {"ref": "v1/evil", "ref_type": "tag"}, False, id="star-one-segment"),
        pytest.param(["refs/heads/release/**"], {"ref": "release/2026/q4"}, True, id="double-star-across"),
        pytest.param(["refs/tags/v*", "refs/heads/main"], {"ref": "main"}, True, id="second-pattern"),
    ],
)
async def test_gitlab_publisher_refs(
    make_gateway: Any, issuer: TestIssuer, refs: list[str], claims: dict[str, Any], allowed: bool
) -> None:
    """A GitLab publisher with `refs` matches only jobs whose ref_path matches one pattern; a miss names refs."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"refs": refs}])
    response = await gateway.mint(issuer.gitlab_token(**claims))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert error_code(response) == "invalid-publisher"
        assert "refs expected" in description(response)


@pytest.mark.parametrize(
    ("ref", "allowed"),
    [pytest.param("refs/tags/v1.4.0", True, id="tag"), pytest.param("refs/heads/main", False, id="branch")],
)
async def test_github_publisher_refs_match_the_full_ref(
    make_gateway: Any, issuer: TestIssuer, ref: str, allowed: bool
) -> None:
    """A GitHub publisher's `refs` are matched against the token's full `ref` claim."""
    github = {"url": issuer.url, "kind": "github", "ca_bundle": str(issuer.ca_path)}
    publisher = {
        "issuer": "github-com",
        "repository": "octo-org/octo-repo",
        "workflow": "release.yml",
        "refs": ["refs/tags/*"],
        "projects": ["octo"],
    }
    gateway = await make_gateway({"github-com": github}, [publisher])
    response = await gateway.mint(issuer.github_token(repository="octo-org/octo-repo", ref=ref))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert "refs expected 'refs/tags/*', token has 'refs/heads/main'" in description(response)


async def test_max_token_age_refuses_old_tokens_without_leeway(
    make_gateway: Any, issuer: TestIssuer, clock: FakeClock
) -> None:
    """`max_token_age` refuses a token whose iat is more than that many seconds ago, even by one second."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, max_token_age=60)}, leeway=30)
    clock.now = now = int(clock())
    fresh = await gateway.mint(issuer.gitlab_token(now=now - 60))
    assert fresh.status_code == 200, fresh.text
    stale = await gateway.mint(issuer.gitlab_token(now=now - 61))
    assert error_code(stale) == "invalid-token"
    assert "at most 60 s old" in description(stale)


@pytest.mark.parametrize(
    ("deny", "claims", "refused_claim"),
    [
        pytest.param({"pipeline_source": ["merge_request_event"]}, {"pipeline_source": "push"}, None, id="allowed"),
        pytest.param(
            {"pipeline_source": ["schedule", "merge_request_event"]},
            {"pipeline_source": "merge_request_event"},
            "pipeline_source",
            id="string-refused",
        ),
        # Any element of a list-valued claim.
        pytest.param({"groups": ["outsiders"]}, {"groups": ["staff", "outsiders"]}, "groups", id="list-element"),
        # JSON types count: the string "1" is not the integer 1.
        pytest.param({"runner_id": [1]}, {"runner_id": "1"}, None, id="types-differ"),
        pytest.param({"runner_id": [12270835]}, {}, "runner_id", id="integer-refused"),
        # A claim the token lacks refuses nothing.
        pytest.param({"absent_claim": ["x"]}, {}, None, id="absent-claim"),
    ],
)
async def test_deny_lists(
    make_gateway: Any, issuer: TestIssuer, deny: dict[str, list[Any]], claims: dict[str, Any], refused_claim: str | None
) -> None:
    """`[issuers.X.deny]` refuses a token whose raw claim equals a listed value, as invalid-publisher naming it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, deny=deny)})
    response = await gateway.mint(issuer.gitlab_token(**claims))
    if refused_claim is None:
        assert response.status_code == 200, response.text
    else:
        assert error_code(response) == "invalid-publisher"
        assert f"claim {refused_claim!r}" in description(response)
        assert "deny" in description(response)


ENVIRONMENT_BOUND = PUBLISHER | {"environment": "release", "projects": ["released"]}
UNBOUND = PUBLISHER


@pytest.mark.parametrize(
    ("environment", "protected", "expected"),
    [
        pytest.param("release", "true", ["released"], id="protected-environment"),
        pytest.param("release", "false", None, id="unprotected-refused-not-fallen-back"),
        pytest.param("release", None, None, id="claim-missing-refused"),
        # No publisher names "review", so the unbound publisher matches as it always would.
        pytest.param("review", "false", ["sampleproject"], id="unnamed-environment"),
        pytest.param(None, None, ["sampleproject"], id="no-environment"),
    ],
)
async def test_require_protected_environment(
    make_gateway: Any, issuer: TestIssuer, environment: str | None, protected: str | None, expected: list[str] | None
) -> None:
    """With `require_protected_environment`, a job matching an environment-bound publisher must run in a protected
    environment, and is refused outright (not matched to the unbound publisher) otherwise."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer, require_protected_environment=True)}, [ENVIRONMENT_BOUND, UNBOUND]
    )
    claims: dict[str, Any] = {"environment": environment}
    if environment is not None:
        claims["environment_protected"] = protected if protected is not None else DELETE
    response = await gateway.mint(issuer.gitlab_token(**claims))
    if expected is None:
        assert error_code(response) == "invalid-publisher"
        assert "not protected" in description(response)
    else:
        assert response.status_code == 200, response.text
        assert response.json()["projects"] == expected


async def test_without_require_protected_environment_unprotected_environments_mint(
    make_gateway: Any, issuer: TestIssuer
) -> None:
    """Without the option, an environment-bound publisher matches a job in an unprotected environment (the default)."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [ENVIRONMENT_BOUND, UNBOUND])
    response = await gateway.mint(issuer.gitlab_token(environment="release", environment_protected="false"))
    assert response.json()["projects"] == ["released"]


async def test_repository_id_pin_refuses_a_resurrected_project(make_gateway: Any, issuer: TestIssuer) -> None:
    """A publisher pinned by repository_id refuses a token for the same path with another project id."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"repository_id": "61254376", "owner_id": "12885807"}]
    )
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    response = await gateway.mint(issuer.gitlab_token(project_id="99999999", job_project_id="99999999"))
    assert error_code(response) == "invalid-publisher"
    assert "repository_id expected '61254376', token has '99999999'" in description(response)
