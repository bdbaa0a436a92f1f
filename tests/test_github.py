"""The GitHub Actions kind, end to end: real signed tokens from the HTTPS test issuer, through the app over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway import config
from gateway.config import Issuer
from gateway.errors import ConfigError
from gateway.issuers import KINDS, github
from gateway.issuers.github import GITHUB
from gateway.testing import DELETE, TestIssuer
from tests.conftest import Gateway, description, error_code, gitlab_issuer, write_config

REPOSITORY = "octo-org/sample-kit"
SHA = "5f3c2a9d8e7b6a1c0f4e3d2c1b0a9f8e7d6c5b4a"
SHARED_SHA = "0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e"
PUBLISHER = {
    "issuer": "github-com",
    "repository": REPOSITORY,
    "workflow": "release.yml",
    "projects": ["sample-kit"],
}


def github_issuer(issuer: TestIssuer, **extra: Any) -> dict[str, Any]:
    return {"url": issuer.url, "kind": "github", "ca_bundle": str(issuer.ca_path)} | extra


def publisher(**fields: Any) -> dict[str, Any]:
    return PUBLISHER | fields


def workflow_ref(rest: str = "release.yml@refs/heads/main", repository: str = REPOSITORY) -> str:
    return f"{repository}/.github/workflows/{rest}"


def assert_refused(response: httpx.Response, code: str, fragment: str = "") -> None:
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    assert fragment.lower() in description(response).lower()


@pytest.fixture
async def hub(make_gateway: Any, issuer: TestIssuer) -> Gateway:
    """A gateway trusting the test issuer as the github kind `github-com`, with one publisher for release.yml."""
    return await make_gateway({"github-com": github_issuer(issuer)}, [PUBLISHER])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ghes(ca: trustme.CA) -> Iterator[TestIssuer]:
    """An issuer at a GitHub Enterprise Server's issuer path, `https://HOST/_services/token`."""
    with TestIssuer(path="/_services/token", ca=ca) as ghes:
        yield ghes


# --- realistic claim sets ------------------------------------------------------------------------------------------

# Each builds the full claim set GitHub sends for one kind of run of octo-org/sample-kit's release.yml.
REALISTIC: dict[str, Callable[[TestIssuer], dict[str, Any]]] = {
    "push-to-branch": lambda i: i.github_claims(),
    "tag-push": lambda i: i.github_claims(ref="refs/tags/v1.4.0"),
    "environment-deployment": lambda i: i.github_claims(
        ref="refs/tags/v1.4.0", event_name="release", environment="pypi"
    ),
    # release.yml calls a shared workflow in another repository; the token comes from a job of the called one.
    "reusable-workflow-call": lambda i: i.github_claims(
        ref="refs/tags/v1.4.0",
        event_name="release",
        environment="pypi",
        job_workflow_ref="octo-org/shared-workflows/.github/workflows/pypi-publish.yml@refs/tags/v2",
        job_workflow_sha=SHARED_SHA,
        enterprise="octo-corp",
        enterprise_id="4711",
    ),
    "pull-request-target": lambda i: i.github_claims(event_name="pull_request_target"),
}
MINTING = [name for name in REALISTIC if name != "pull-request-target"]


@pytest.mark.parametrize("name", MINTING)
async def test_realistic_github_tokens_mint(make_gateway: Any, issuer: TestIssuer, name: str) -> None:
    """Push, tag, environment and reusable-workflow tokens of release.yml mint for its publisher."""
    claims = REALISTIC[name](issuer)
    # A run in an environment is checked against a publisher bound to it, the others against an unbound one.
    bound = {"environment": claims["environment"]} if "environment" in claims else {}
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(**bound)])
    response = await gateway.mint(issuer.sign(claims))
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == ["sample-kit"]


@pytest.mark.parametrize("name", list(REALISTIC))
def test_every_claim_github_sends_is_classified(issuer: TestIssuer, name: str) -> None:
    """Every claim of each realistic GitHub token is either mapped or deliberately ignored by the github kind."""
    claims = REALISTIC[name](issuer)
    known = GITHUB.known_claims(Issuer(name="github-com", url=issuer.url, kind="github"))
    assert set(claims) - known == set()


def test_github_claim_tables_are_disjoint_and_make_up_known_claims(issuer: TestIssuer) -> None:
    """No claim is classified twice, and known_claims is exactly REQUIRED, OPTIONAL and UNCHECKED together."""
    tables = [set(github.REQUIRED), set(github.OPTIONAL), set(github.UNCHECKED)]
    assert sum(len(t) for t in tables) == len(set().union(*tables))
    known = GITHUB.known_claims(Issuer(name="github-com", url=issuer.url, kind="github"))
    assert known == set().union(*tables)


def test_github_kind_is_registered() -> None:
    """`kind = "github"` in issuers.toml selects the GitHub kind, which compares environments case-insensitively."""
    assert KINDS["github"] is GITHUB
    assert GITHUB.environment_case_sensitive is False


async def test_pull_request_target_is_refused(hub: Gateway, issuer: TestIssuer) -> None:
    """A pull_request_target run of the registered workflow is invalid-publisher, naming the event."""
    response = await hub.mint(issuer.sign(REALISTIC["pull-request-target"](issuer)))
    assert_refused(response, "invalid-publisher", "pull_request_target")
    # Control: the same run triggered by a push mints, so the refusal is about the event alone.
    assert (await hub.mint(issuer.github_token())).status_code == 200


async def test_refused_pull_request_target_does_not_spend_its_jti(hub: Gateway, issuer: TestIssuer) -> None:
    """The refused pull_request_target token leaves its jti unspent, like every refusal before matching."""
    claims = REALISTIC["pull-request-target"](issuer)
    assert_refused(await hub.mint(issuer.sign(claims)), "invalid-publisher")
    pushed = issuer.github_token(jti=claims["jti"])
    assert (await hub.mint(pushed)).status_code == 200


# --- identity ----------------------------------------------------------------------------------------------------


async def minted_identity(gateway: Gateway, token: str) -> dict[str, Any]:
    response = await gateway.mint(token)
    assert response.status_code == 200, response.text
    keys = KeySet.import_key_set((await gateway.client.get("/.well-known/jwks.json")).json())
    claims = jwt.decode(response.json()["token"], keys, algorithms=["ES256"]).claims
    assert claims["sub"] == f"github-com:{REPOSITORY}"
    return claims["identity"]  # type: ignore[no-any-return]


async def test_minted_identity_has_normalized_github_fields(hub: Gateway, issuer: TestIssuer) -> None:
    """The minted identity maps GitHub's claims onto the common fields, with the workflow file name and tag name."""
    identity = await minted_identity(hub, issuer.sign(REALISTIC["reusable-workflow-call"](issuer)))
    assert identity == {
        "issuer": "github-com",
        "issuer_url": issuer.url,
        "kind": "github",
        "repository": REPOSITORY,
        "repository_id": "728105936",
        "owner": "octo-org",
        "owner_id": "91482733",
        "workflow": "release.yml",
        "ref": "v1.4.0",
        "ref_path": "refs/tags/v1.4.0",
        "ref_type": "tag",
        "sha": SHA,
        "environment": "pypi",
        "trigger": "release",
        "run_id": "12688012345",
        "actor": "octocat",
        "runner_environment": "github-hosted",
        "visibility": "public",
        "protected_ref": True,
    }


@pytest.mark.parametrize(
    ("ref", "event", "expected_ref", "expected_type"),
    [
        pytest.param("refs/heads/main", "push", "main", "branch", id="branch"),
        pytest.param("refs/heads/release/1.x", "push", "release/1.x", "branch", id="branch-with-slash"),
        pytest.param("refs/tags/v1.4.0", "push", "v1.4.0", "tag", id="tag"),
        # GitHub types a pull request's merge ref as a branch; it is not under refs/heads/, so it stays whole.
        pytest.param("refs/pull/7/merge", "pull_request", "refs/pull/7/merge", "branch", id="pull-request"),
    ],
)
async def test_identity_ref_is_the_branch_or_tag_name(
    hub: Gateway, issuer: TestIssuer, ref: str, event: str, expected_ref: str, expected_type: str
) -> None:
    """The identity's ref is the short branch or tag name, as for GitLab; other refs are kept whole."""
    identity = await minted_identity(hub, issuer.github_token(ref=ref, event_name=event))
    assert (identity["ref"], identity["ref_type"], identity["trigger"]) == (expected_ref, expected_type, event)


@pytest.mark.parametrize(
    ("ref_protected", "expected"),
    [
        pytest.param("true", True, id="true"),
        pytest.param("false", False, id="false"),
        pytest.param(DELETE, None, id="absent"),
    ],
)
async def test_identity_protected_ref_comes_from_ref_protected(
    hub: Gateway, issuer: TestIssuer, ref_protected: Any, expected: bool | None
) -> None:
    """GitHub's ref_protected "true"/"false" becomes protected_ref true/false, and an absent claim null."""
    identity = await minted_identity(hub, issuer.github_token(ref_protected=ref_protected))
    assert identity["protected_ref"] is expected


async def test_deployment_of_a_bare_sha_matches_via_the_sha_pin(hub: Gateway, issuer: TestIssuer) -> None:
    """A run with an empty ref whose workflow_ref is pinned to the sha is accepted, with ref null."""
    token = issuer.github_token(
        ref="", ref_type="", event_name="deployment", workflow_ref=workflow_ref(f"release.yml@{SHA}")
    )
    identity = await minted_identity(hub, token)
    assert (identity["ref"], identity["ref_type"], identity["workflow"]) == (None, None, "release.yml")


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        pytest.param("workflow_ref", DELETE, id="missing-workflow-ref"),
        pytest.param("repository_owner_id", DELETE, id="missing-owner-id"),
        pytest.param("ref", DELETE, id="missing-ref"),
        pytest.param("repository_id", 728105936, id="repository-id-as-int"),
        pytest.param("run_id", 12688012345, id="run-id-as-int"),
        pytest.param("ref_protected", True, id="ref-protected-as-bool"),
        pytest.param("environment", ["pypi"], id="environment-as-list"),
    ],
)
async def test_github_claim_types_are_checked(hub: Gateway, issuer: TestIssuer, claim: str, value: Any) -> None:
    """A missing required GitHub claim or one of the wrong JSON type is invalid-token naming the claim."""
    # Set after building the claims, so that the claims derived from ref (ref_type, sub) stay well formed.
    claims = issuer.github_claims()
    if value is DELETE:
        del claims[claim]
    else:
        claims[claim] = value
    response = await hub.mint(issuer.sign(claims))
    assert_refused(response, "invalid-token", claim)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"repository_owner": "evil-org"}, id="owner-of-another-repository"),
        pytest.param({"repository": "sample-kit", "repository_owner": "sample-kit"}, id="no-owner-segment"),
        pytest.param({"repository": "octo-org/sample-kit/extra"}, id="three-segments"),
        pytest.param({"repository_owner": "octo-or\u0261"}, id="look-alike-owner"),
    ],
)
async def test_repository_and_repository_owner_must_agree(
    hub: Gateway, issuer: TestIssuer, overrides: dict[str, Any]
) -> None:
    """A token whose repository is not `owner/name` of its repository_owner is invalid-token, not a match."""
    response = await hub.mint(issuer.github_token(**overrides))
    assert_refused(response, "invalid-token", "repository")


async def test_repository_owner_is_compared_case_insensitively(hub: Gateway, issuer: TestIssuer) -> None:
    """repository_owner "Octo-Org" agrees with repository octo-org/sample-kit, as GitHub owners are case-insensitive."""
    assert (await hub.mint(issuer.github_token(repository_owner="Octo-Org"))).status_code == 200


# --- workflow ----------------------------------------------------------------------------------------------------


async def test_workflow_comes_from_workflow_ref_not_the_workflow_name(hub: Gateway, issuer: TestIssuer) -> None:
    """The display name in the `workflow` claim is ignored: only the file in workflow_ref is matched."""
    token = issuer.github_token(workflow_file="ci.yml", workflow="release.yml")
    assert_refused(await hub.mint(token), "invalid-publisher", "workflow expected 'release.yml', token has 'ci.yml'")


def test_publisher_workflow_given_as_a_path_is_a_load_error(tmp_path: Path, issuer: TestIssuer) -> None:
    """A github publisher whose workflow is a path rather than a file name is refused at load, not left unmatchable."""
    registered = publisher(workflow=".github/workflows/x.yml")
    path = write_config(tmp_path, {"github-com": github_issuer(issuer)}, [registered])
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    assert "[[publisher]] #1 workflow: for a github issuer, the file name" in refused.value.problems[0]


@pytest.mark.parametrize(
    ("registered", "ran", "status"),
    [
        pytest.param("release.yml", "release.yml", 200, id="same"),
        pytest.param("release.yaml", "release.yaml", 200, id="yaml-same"),
        pytest.param("release.yml", "Release.yml", 422, id="case-differs"),
        pytest.param("release.yml", "release.yaml", 422, id="extension-differs"),
        pytest.param("release.yml", "pre-release.yml", 422, id="longer"),
    ],
)
async def test_workflow_file_name_is_compared_exactly(
    make_gateway: Any, issuer: TestIssuer, registered: str, ran: str, status: int
) -> None:
    """The file name from workflow_ref must equal the publisher's workflow exactly, case and extension included."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(workflow=registered)])
    response = await gateway.mint(issuer.github_token(workflow_file=ran))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", f"workflow expected {registered!r}, token has {ran!r}")


@pytest.mark.parametrize(
    ("ref", "registered"),
    [
        pytest.param(workflow_ref(f"release.yml@{SHA}"), "release.yml", id="pinned-to-sha"),
        pytest.param(workflow_ref(repository="Octo-Org/Sample-Kit"), "release.yml", id="repository-part-case-differs"),
        # "@" may appear in a file name; the pin is found from the run's ref, not by splitting on "@".
        pytest.param(workflow_ref("release@v2.yml@refs/heads/main"), "release@v2.yml", id="at-sign-in-file-name"),
    ],
)
async def test_valid_workflow_ref_variants_are_accepted(
    make_gateway: Any, issuer: TestIssuer, ref: str, registered: str
) -> None:
    """workflow_ref pinned to the sha, with the repository part in other case, or with "@" in the file is valid."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(workflow=registered)])
    response = await gateway.mint(issuer.github_token(workflow_ref=ref))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param(workflow_ref(repository="octo-org/other-kit"), id="other-repository"),
        pytest.param(workflow_ref(repository="octo-org/sample-kit-evil"), id="longer-repository"),
        pytest.param(workflow_ref(repository="octo-org/sample"), id="shorter-repository"),
        pytest.param(workflow_ref(repository="evil-org/sample-kit"), id="other-owner"),
        pytest.param("github.com/" + workflow_ref(), id="host-prefix"),
        pytest.param("octo-org/.github/workflows/release.yml@refs/heads/main", id="owner-only"),
        pytest.param(workflow_ref("ci/release.yml@refs/heads/main"), id="subdirectory"),
        pytest.param(f"{REPOSITORY}/.github/workflows-evil/release.yml@refs/heads/main", id="workflows-evil"),
        pytest.param(f"{REPOSITORY}/.GITHUB/workflows/release.yml@refs/heads/main", id="dot-github-case"),
        pytest.param(f"{REPOSITORY}/release.yml@refs/heads/main", id="repository-root"),
        pytest.param(f"{REPOSITORY}/dynamic/github-code-scanning/codeql@refs/heads/main", id="dynamic-workflow"),
        pytest.param(workflow_ref("../../../evil-org/x/.github/workflows/release.yml@refs/heads/main"), id="dotdot"),
        pytest.param(f"{REPOSITORY}/.github/workflows/../workflows/release.yml@refs/heads/main", id="dotdot-back-in"),
        # KELVIN SIGN lower()s to "k", so only an ASCII-only fold keeps the look-alike repository apart.
        pytest.param(workflow_ref(repository="octo-org/sample-\u212ait"), id="kelvin-sign-repository"),
        pytest.param(workflow_ref(repository="octo-org/sample-\u212aIT"), id="kelvin-sign-upper"),
        pytest.param(workflow_ref(repository="\uff4fcto-org/sample-kit"), id="fullwidth-owner"),
        pytest.param(workflow_ref("release.yml@refs/heads/other"), id="pinned-to-other-ref"),
        pytest.param(workflow_ref("release.yml@" + "0" * 40), id="pinned-to-other-sha"),
        pytest.param(workflow_ref("release.yml"), id="no-pin"),
        pytest.param(workflow_ref("release.sh@refs/heads/main"), id="not-yaml"),
        pytest.param(workflow_ref(".yml@refs/heads/main"), id="bare-extension"),
        pytest.param(workflow_ref("@refs/heads/main"), id="empty-file-name"),
    ],
)
async def test_workflow_ref_outside_the_repository_workflows_is_refused(
    make_gateway: Any, issuer: TestIssuer, ref: str
) -> None:
    """A workflow_ref naming another repository, directory, ref, or a non-workflow file is invalid-publisher."""
    # Publishers for `ci/release.yml` or `release.sh` cannot even be registered (a load error), so the tricks
    # face the plain publisher and the workflow_ref check must refuse them before any matching.
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher()])
    response = await gateway.mint(issuer.github_token(workflow_ref=ref))
    assert_refused(response, "invalid-publisher", "workflow_ref")


async def test_reusable_workflow_matches_the_caller_not_the_called_file(make_gateway: Any, issuer: TestIssuer) -> None:
    """Inside a called reusable workflow, a publisher for the caller's file matches; one for the called file not."""
    claims = REALISTIC["reusable-workflow-call"](issuer)
    called = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(workflow="pypi-publish.yml")])
    assert_refused(
        await called.mint(issuer.sign(claims)),
        "invalid-publisher",
        "workflow expected 'pypi-publish.yml', token has 'release.yml'",
    )
    caller = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(workflow="release.yml")])
    assert (await caller.mint(issuer.sign(claims))).status_code == 200


async def test_shared_workflow_repository_cannot_publish_for_its_callers(make_gateway: Any, issuer: TestIssuer) -> None:
    """A run of the shared workflow's own repository does not match a caller's publisher, whatever it calls."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [PUBLISHER])
    token = issuer.github_token(
        repository="octo-org/shared-workflows",
        workflow_file="pypi-publish.yml",
        job_workflow_ref=workflow_ref(),
    )
    assert_refused(await gateway.mint(token), "invalid-publisher", "no publisher is registered")


# --- repository, environment, owner_id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registered", "token_repository"),
    [
        pytest.param("Octo-Org/Sample-Kit", "octo-org/sample-kit", id="publisher-upper"),
        pytest.param("octo-org/sample-kit", "OCTO-ORG/Sample-Kit", id="token-upper"),
    ],
)
async def test_repository_matches_case_insensitively(
    make_gateway: Any, issuer: TestIssuer, registered: str, token_repository: str
) -> None:
    """A publisher's repository matches the token's repository regardless of ASCII case."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(repository=registered)])
    response = await gateway.mint(issuer.github_token(repository=token_repository))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "token_repository",
    [
        pytest.param("octo-org/sample-\u212ait", id="kelvin-sign"),
        pytest.param("octo-org/s\u0430mple-kit", id="cyrillic-a"),
    ],
)
async def test_look_alike_repository_never_matches(hub: Gateway, issuer: TestIssuer, token_repository: str) -> None:
    """A validly signed token for a non-ASCII look-alike of the registered repository is invalid-publisher."""
    response = await hub.mint(issuer.github_token(repository=token_repository))
    assert_refused(response, "invalid-publisher")


@pytest.mark.parametrize(
    ("environment", "status"),
    [
        pytest.param("pypi", 200, id="equal"),
        pytest.param("PyPI", 200, id="case-differs"),
        pytest.param("PYPI", 200, id="upper"),
        pytest.param("pypi-test", 422, id="longer"),
        pytest.param(None, 422, id="no-environment"),
    ],
)
async def test_environment_is_compared_case_insensitively(
    make_gateway: Any, issuer: TestIssuer, environment: str | None, status: int
) -> None:
    """A publisher bound to environment "pypi" accepts "PyPI" (one GitHub environment) but not another name."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(environment="pypi")])
    response = await gateway.mint(issuer.github_token(environment=environment))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "environment expected 'pypi'")


async def test_look_alike_environment_never_matches(make_gateway: Any, issuer: TestIssuer) -> None:
    """An environment spelled with KELVIN SIGN is another GitHub environment and must not match "release-kit"."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(environment="release-kit")])
    response = await gateway.mint(issuer.github_token(environment="release-\u212ait"))
    assert_refused(response, "invalid-publisher", "environment expected 'release-kit'")


@pytest.mark.parametrize(
    ("owner_id", "status"),
    [
        pytest.param("91482733", 200, id="equal"),
        pytest.param("1", 422, id="other-owner"),
    ],
)
async def test_owner_id_pins_repository_owner_id(
    make_gateway: Any, issuer: TestIssuer, owner_id: str, status: int
) -> None:
    """A publisher pinned to owner_id 91482733 matches only tokens whose repository_owner_id is 91482733."""
    gateway = await make_gateway({"github-com": github_issuer(issuer)}, [publisher(owner_id="91482733")])
    response = await gateway.mint(issuer.github_token(repository_owner_id=owner_id))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "owner_id expected '91482733', token has '1'")


# --- issuers and kinds -------------------------------------------------------------------------------------------


async def test_github_token_never_matches_a_gitlab_publisher(
    make_gateway: Any, issuer: TestIssuer, other_issuer: TestIssuer
) -> None:
    """A GitHub token for octo-org/sample-kit never matches a GitLab issuer's publisher for the same repository."""
    gateway = await make_gateway(
        {"github-com": github_issuer(issuer), "gitlab-com": gitlab_issuer(other_issuer)},
        [publisher(issuer="gitlab-com")],
    )
    assert_refused(await gateway.mint(issuer.github_token()), "invalid-publisher", "of issuer 'github-com'")
    # Control: the GitLab issuer's own token for that repository and file does match the publisher.
    gitlab = other_issuer.gitlab_token(project_path=REPOSITORY, workflow="release.yml")
    assert (await gateway.mint(gitlab)).status_code == 200


async def test_github_issuer_refuses_gitlab_shaped_tokens(hub: Gateway, issuer: TestIssuer) -> None:
    """A GitLab-shaped token signed by an issuer configured as github lacks GitHub's claims and is invalid-token."""
    response = await hub.mint(issuer.gitlab_token(project_path=REPOSITORY, workflow="release.yml"))
    assert_refused(response, "invalid-token", "missing required claim")


async def test_enterprise_server_issuer_is_matched_by_its_exact_url(
    make_gateway: Any, issuer: TestIssuer, ghes: TestIssuer
) -> None:
    """A GitHub Enterprise Server issuer at /_services/token serves its publishers, and github.com's token does not."""
    assert ghes.url.endswith("/_services/token")
    gateway = await make_gateway(
        {"github-com": github_issuer(issuer), "ghes": github_issuer(ghes)},
        [publisher(issuer="ghes")],
    )
    assert (await gateway.mint(ghes.github_token())).status_code == 200
    assert_refused(await gateway.mint(issuer.github_token()), "invalid-publisher", "of issuer 'github-com'")


# --- per-issuer policy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref_protected", "status"),
    [
        pytest.param("true", 200, id="protected"),
        pytest.param("false", 422, id="unprotected"),
        pytest.param(DELETE, 422, id="absent"),
    ],
)
async def test_require_protected_ref(make_gateway: Any, issuer: TestIssuer, ref_protected: Any, status: int) -> None:
    """With require_protected_ref, a GitHub token mints only if it says ref_protected "true"."""
    gateway = await make_gateway({"github-com": github_issuer(issuer, require_protected_ref=True)}, [PUBLISHER])
    response = await gateway.mint(issuer.github_token(ref_protected=ref_protected))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "not protected")


@pytest.mark.parametrize(
    ("runner", "status"),
    [
        pytest.param("github-hosted", 200, id="github-hosted"),
        pytest.param("self-hosted", 422, id="self-hosted"),
        pytest.param(DELETE, 422, id="absent"),
    ],
)
async def test_runner_environments_github_hosted_only(
    make_gateway: Any, issuer: TestIssuer, runner: Any, status: int
) -> None:
    """With runner_environments = ["github-hosted"], self-hosted runs and runs that do not say are refused."""
    gateway = await make_gateway(
        {"github-com": github_issuer(issuer, runner_environments=["github-hosted"])}, [PUBLISHER]
    )
    response = await gateway.mint(issuer.github_token(runner_environment=runner))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "github-hosted")
