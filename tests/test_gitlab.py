"""The GitLab kind (contract section 6), end to end: real signed tokens from the HTTPS test issuer, over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.config import Issuer
from gateway.errors import ConfigError
from gateway.issuers import gitlab
from gateway.issuers.gitlab import GITLAB
from gateway.testing import DELETE, TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer

SHA = "a3f1c9e07b52d48e6f0c2b9d17e4a85c3b6d0f92"


def publisher(**fields: Any) -> dict[str, Any]:
    return PUBLISHER | fields


def config_uri(issuer: TestIssuer, project: str = "group/project", rest: str = ".gitlab-ci.yml@refs/heads/main") -> str:
    return f"{issuer.host}{issuer.path}/{project}//{rest}"


def assert_refused(response: Any, code: str, fragment: str = "") -> None:
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    assert fragment.lower() in description(response).lower()


# --- ci_config_ref_uri -------------------------------------------------------------------------------------------


async def test_null_ci_config_ref_uri_is_refused_with_explanation(gateway: Gateway, issuer: TestIssuer) -> None:
    """A null ci_config_ref_uri is invalid-publisher, explaining the CI config lives in another project."""
    response = await gateway.mint(issuer.gitlab_token(ci_config_ref_uri=None))
    assert_refused(response, "invalid-publisher", "another project")


async def test_missing_ci_config_ref_uri_is_invalid_token(gateway: Gateway, issuer: TestIssuer) -> None:
    """A token without the ci_config_ref_uri claim at all is invalid-token."""
    response = await gateway.mint(issuer.gitlab_token(ci_config_ref_uri=DELETE))
    assert_refused(response, "invalid-token", "ci_config_ref_uri")


@pytest.mark.parametrize(
    "make_uri",
    [
        pytest.param(lambda i: config_uri(i, "other/project"), id="another-project"),
        pytest.param(lambda i: config_uri(i, "group/project-evil"), id="prefix-of-longer-project"),
        pytest.param(lambda i: config_uri(i, "group"), id="parent-group"),
        pytest.param(lambda i: config_uri(i, "group/projec\u212a"), id="kelvin-sign-look-alike"),
        pytest.param(lambda i: "gitlab.example.com/group/project//.gitlab-ci.yml@refs/heads/main", id="other-host"),
        pytest.param(lambda i: f"{i.host}0/group/project//.gitlab-ci.yml@refs/heads/main", id="host-port-prefix"),
        pytest.param(
            lambda i: f"evil.example/{i.host}/group/project//.gitlab-ci.yml@refs/heads/main", id="host-in-path"
        ),
        pytest.param(lambda i: config_uri(i, rest=".gitlab-ci.yml@refs/heads/other"), id="pinned-to-other-ref"),
        pytest.param(lambda i: config_uri(i, rest=".gitlab-ci.yml@" + "0" * 40), id="pinned-to-other-sha"),
        pytest.param(lambda i: config_uri(i, rest=".gitlab-ci.yml"), id="no-ref"),
        pytest.param(lambda i: f"{i.host}/group/project/.gitlab-ci.yml@refs/heads/main", id="no-double-slash"),
    ],
)
async def test_ci_config_ref_uri_outside_the_project_and_ref_is_refused(
    gateway: Gateway, issuer: TestIssuer, make_uri: Any
) -> None:
    """A ci_config_ref_uri naming another host, project or ref is invalid-publisher and says so."""
    response = await gateway.mint(issuer.gitlab_token(ci_config_ref_uri=make_uri(issuer)))
    assert_refused(response, "invalid-publisher", "ci_config_ref_uri")


async def test_config_of_longer_project_does_not_satisfy_its_prefix(make_gateway: Any, issuer: TestIssuer) -> None:
    """`group/proj-evil//...` cannot stand in for project group/proj, nor `group/proj//...` for group/pro."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)},
        [publisher(repository="group/proj"), publisher(repository="group/pro")],
    )
    evil = issuer.gitlab_token(project_path="group/proj", ci_config_ref_uri=config_uri(issuer, "group/proj-evil"))
    assert_refused(await gateway.mint(evil), "invalid-publisher", "ci_config_ref_uri")
    longer = issuer.gitlab_token(project_path="group/pro", ci_config_ref_uri=config_uri(issuer, "group/proj"))
    assert_refused(await gateway.mint(longer), "invalid-publisher", "ci_config_ref_uri")
    # The same publishers accept each project's own config, so the refusals above are about the uri alone.
    assert (await gateway.mint(issuer.gitlab_token(project_path="group/proj"))).status_code == 200
    assert (await gateway.mint(issuer.gitlab_token(project_path="group/pro"))).status_code == 200


async def test_ci_config_pinned_to_sha_is_accepted(gateway: Gateway, issuer: TestIssuer) -> None:
    """A ci_config_ref_uri pinned to the job's sha instead of its ref_path is accepted."""
    token = issuer.gitlab_token(ci_config_ref_uri=config_uri(issuer, rest=f".gitlab-ci.yml@{SHA}"))
    response = await gateway.mint(token)
    assert response.status_code == 200, response.text


async def test_a_branch_with_an_at_sign_is_accepted(gateway: Gateway, issuer: TestIssuer) -> None:
    """A branch named `rel@1` mints: the pin `@refs/heads/rel@1` is matched whole, not cut at its last '@'."""
    response = await gateway.mint(issuer.gitlab_token(ref="rel@1"))
    assert response.status_code == 200, response.text
    claims = jwt.decode(
        response.json()["token"], KeySet.import_key_set((await gateway.client.get("/.well-known/jwks.json")).json())
    ).claims
    assert claims["identity"]["ref"] == "rel@1"
    assert claims["identity"]["workflow"] == ".gitlab-ci.yml"


async def test_a_config_path_with_at_signs_pinned_to_an_at_branch(make_gateway: Any, issuer: TestIssuer) -> None:
    """A config path holding '@' on a branch holding '@' yields exactly the registered path, pinned by ref or sha."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(workflow="ci/a@b.yml")])
    by_ref = issuer.gitlab_token(ref="v@2", workflow="ci/a@b.yml")
    assert (await gateway.mint(by_ref)).status_code == 200
    by_sha = issuer.gitlab_token(ref="v@2", ci_config_ref_uri=config_uri(issuer, rest=f"ci/a@b.yml@{SHA}"))
    assert (await gateway.mint(by_sha)).status_code == 200


@pytest.mark.parametrize(
    ("rest", "overrides"),
    [
        pytest.param(".gitlab-ci.yml@", {"ref_path": ""}, id="empty-ref_path-empty-pin"),
        pytest.param(".gitlab-ci.yml@", {"sha": ""}, id="empty-sha-empty-pin"),
        pytest.param(".gitlab-ci.yml@", {"ref_path": "", "sha": ""}, id="both-empty"),
        pytest.param(".gitlab-ci.yml@", {"ref_path": DELETE, "ref": ""}, id="derived-ref_path-of-empty-ref"),
        pytest.param(".gitlab-ci.yml@refs/heads/", {"ref_path": DELETE, "ref": ""}, id="bare-branch-namespace"),
        pytest.param("@refs/heads/main", {}, id="empty-config-path"),
    ],
)
async def test_empty_values_never_pin(
    make_gateway: Any, issuer: TestIssuer, rest: str, overrides: dict[str, Any]
) -> None:
    """An empty ref_path or sha (or an empty config path) never satisfies ci_config_ref_uri: invalid-publisher."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)}, [publisher(), publisher(workflow=".gitlab-ci.yml@")]
    )
    token = issuer.gitlab_token(ci_config_ref_uri=config_uri(issuer, rest=rest), **overrides)
    assert_refused(await gateway.mint(token), "invalid-publisher", "ci_config_ref_uri")


async def test_an_empty_ref_path_leaves_the_sha_pin(gateway: Gateway, issuer: TestIssuer) -> None:
    """With ref_path empty, a ci_config_ref_uri pinned to the job's (non-empty) sha still mints."""
    token = issuer.gitlab_token(ref_path="", ci_config_ref_uri=config_uri(issuer, rest=f".gitlab-ci.yml@{SHA}"))
    assert (await gateway.mint(token)).status_code == 200


async def test_ci_config_project_part_is_case_insensitive(gateway: Gateway, issuer: TestIssuer) -> None:
    """The project part of ci_config_ref_uri is compared case-insensitively with project_path."""
    response = await gateway.mint(issuer.gitlab_token(ci_config_ref_uri=config_uri(issuer, "Group/Project")))
    assert response.status_code == 200, response.text


async def test_ci_config_ref_path_derived_when_ref_path_claim_absent(gateway: Gateway, issuer: TestIssuer) -> None:
    """Without a ref_path claim, the pin is checked against refs/heads/<ref> built from ref and ref_type."""
    assert (await gateway.mint(issuer.gitlab_token(ref_path=DELETE))).status_code == 200
    other = issuer.gitlab_token(ref_path=DELETE, ci_config_ref_uri=config_uri(issuer, rest=".gitlab-ci.yml@main"))
    assert_refused(await gateway.mint(other), "invalid-publisher", "neither")


@pytest.mark.parametrize(
    ("registered", "ran", "status"),
    [
        pytest.param(".gitlab-ci.yml", ".gitlab-ci.yml", 200, id="same"),
        pytest.param(".gitlab-ci.yml", ".gitlab-ci.YML", 422, id="case-differs"),
        pytest.param(".gitlab-ci.yml", "ci/.gitlab-ci.yml", 422, id="in-subdirectory"),
        pytest.param("ci/release.yml", "ci/release.yml", 200, id="subdirectory-same"),
        pytest.param("ci/release.yml", ".gitlab-ci.yml", 422, id="subdirectory-vs-root"),
        pytest.param("ci/release.yml", "CI/release.yml", 422, id="subdirectory-case-differs"),
        pytest.param("ci/release.yml", "ci/release.yml.bak", 422, id="suffix"),
    ],
)
async def test_workflow_path_is_compared_exactly(
    make_gateway: Any, issuer: TestIssuer, registered: str, ran: str, status: int
) -> None:
    """The CI config path from ci_config_ref_uri must equal the publisher's workflow exactly, case included."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(workflow=registered)])
    response = await gateway.mint(issuer.gitlab_token(workflow=ran))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", f"workflow expected {registered!r}, token has {ran!r}")


# --- project path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registered", "token_path"),
    [
        pytest.param("Group/Project", "group/project", id="publisher-upper"),
        pytest.param("group/project", "Group/Project", id="token-upper"),
        pytest.param("GROUP/sub/PROJECT", "group/SUB/project", id="subgroup-mixed"),
    ],
)
async def test_project_path_matches_case_insensitively(
    make_gateway: Any, issuer: TestIssuer, registered: str, token_path: str
) -> None:
    """A publisher's repository matches the token's project_path regardless of ASCII case."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(repository=registered)])
    response = await gateway.mint(issuer.gitlab_token(project_path=token_path))
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == ["sampleproject"]


@pytest.mark.parametrize(
    ("registered", "token_path"),
    [
        pytest.param("group/project", "group/pr\u043eject", id="cyrillic-o"),
        # KELVIN SIGN lower()s to an ASCII "k": the classic case-folding collision.
        pytest.param("group/kit", "group/\u212ait", id="kelvin-sign"),
        pytest.param("group/kit", "GROUP/\u212aIT", id="kelvin-sign-upper"),
        pytest.param("group/project", "\uff47\uff52\uff4f\uff55\uff50/project", id="fullwidth-group"),
        pytest.param("group/project", "group/\uff30roject", id="fullwidth-upper-p"),
    ],
)
async def test_homoglyph_project_path_never_matches(
    make_gateway: Any, issuer: TestIssuer, registered: str, token_path: str
) -> None:
    """A non-ASCII look-alike project_path in a validly signed token never matches an ASCII publisher."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(repository=registered)])
    response = await gateway.mint(issuer.gitlab_token(project_path=token_path))
    assert_refused(response, "invalid-publisher")


# --- job_project_path --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_project_path", "status"),
    [
        pytest.param("forker/project", 422, id="fork"),
        pytest.param("group/project-fork", 422, id="fork-same-group"),
        pytest.param("group/project", 200, id="equal"),
        pytest.param("Group/Project", 200, id="equal-but-for-ascii-case"),
        # KELVIN SIGN lower()s to "k": only ASCII is folded, so this is another project.
        pytest.param("group/projec\u212a", 422, id="kelvin-sign-look-alike"),
        pytest.param(DELETE, 200, id="absent"),
    ],
)
async def test_job_project_path_must_equal_project_path(
    gateway: Gateway, issuer: TestIssuer, job_project_path: Any, status: int
) -> None:
    """A job_project_path other than project_path (a fork's MR pipeline) is refused; equal or absent is ok."""
    response = await gateway.mint(issuer.gitlab_token(job_project_path=job_project_path))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "fork")


# --- environment -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "status"),
    [
        pytest.param(None, 422, id="token-without-environment"),
        pytest.param("Release", 422, id="case-differs"),
        pytest.param("release-candidate", 422, id="longer"),
        pytest.param("release", 200, id="equal"),
    ],
)
async def test_bound_publisher_requires_exact_environment(
    make_gateway: Any, issuer: TestIssuer, environment: str | None, status: int
) -> None:
    """A publisher with environment "release" accepts only tokens whose environment is exactly "release"."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(environment="release")])
    response = await gateway.mint(issuer.gitlab_token(environment=environment))
    assert response.status_code == status, response.text
    if status == 422:
        assert_refused(response, "invalid-publisher", "environment expected 'release'")


@pytest.mark.parametrize(
    ("environment", "projects"),
    [
        pytest.param("release", ["b"], id="bound-wins"),
        pytest.param(None, ["a"], id="no-environment-gets-unbound"),
        pytest.param("staging", ["a"], id="other-environment-gets-unbound"),
    ],
)
async def test_environment_bound_publisher_wins_over_unbound(
    make_gateway: Any, issuer: TestIssuer, environment: str | None, projects: list[str]
) -> None:
    """When a bound and an unbound publisher both match, only the bound one's projects are granted."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)},
        [publisher(projects=["a"]), publisher(projects=["b"], environment="release")],
    )
    response = await gateway.mint(issuer.gitlab_token(environment=environment))
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == projects


# --- owner_id ----------------------------------------------------------------------------------------------------


async def test_owner_id_pin_equal_to_namespace_id_is_accepted(make_gateway: Any, issuer: TestIssuer) -> None:
    """A publisher pinned to owner_id matches a token whose namespace_id equals it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(owner_id="12885807")])
    response = await gateway.mint(issuer.gitlab_token(namespace_id="12885807"))
    assert response.status_code == 200, response.text


async def test_owner_id_pin_differing_is_refused(make_gateway: Any, issuer: TestIssuer) -> None:
    """A publisher pinned to another owner_id refuses the token and names owner_id as the differing field."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher(owner_id="12885807")])
    response = await gateway.mint(issuer.gitlab_token(namespace_id="99999999"))
    assert_refused(response, "invalid-publisher", "owner_id expected '12885807', token has '99999999'")


# --- issuers -----------------------------------------------------------------------------------------------------


async def test_self_hosted_issuer_cannot_satisfy_gitlab_com_publisher(
    make_gateway: Any, issuer: TestIssuer, other_issuer: TestIssuer
) -> None:
    """A valid token from another trusted issuer for the same repository never matches a gitlab-com publisher."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer), "cern": gitlab_issuer(other_issuer)})
    response = await gateway.mint(other_issuer.gitlab_token())
    assert_refused(response, "invalid-publisher", "of issuer 'cern'")
    # Control: the same claims from the publisher's own issuer are accepted.
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200


async def test_namespaces_admit_paths_on_a_segment_boundary(make_gateway: Any, other_issuer: TestIssuer) -> None:
    """An issuer limited to namespace atlas loads and serves publishers atlas/x and atlas/sub/x."""
    gateway = await make_gateway(
        {"cern": gitlab_issuer(other_issuer, namespaces=["atlas"])},
        [
            publisher(issuer="cern", repository="atlas/x", projects=["x"]),
            publisher(issuer="cern", repository="atlas/sub/x", projects=["sub-x"]),
        ],
    )
    for path, projects in (("atlas/x", ["x"]), ("atlas/sub/x", ["sub-x"])):
        response = await gateway.mint(other_issuer.gitlab_token(project_path=path))
        assert response.status_code == 200, response.text
        assert response.json()["projects"] == projects


async def test_publisher_outside_namespaces_is_a_load_error(make_gateway: Any, other_issuer: TestIssuer) -> None:
    """A publisher atlas-evil/x for an issuer limited to namespace atlas refuses to load."""
    with pytest.raises(ConfigError) as raised:
        await make_gateway(
            {"cern": gitlab_issuer(other_issuer, namespaces=["atlas"])},
            [publisher(issuer="cern", repository="atlas-evil/x")],
        )
    assert any(
        "[[publisher]] #1 repository" in line and "outside the namespaces" in line for line in raised.value.problems
    ), raised.value.problems


async def test_token_outside_namespaces_is_refused(make_gateway: Any, other_issuer: TestIssuer) -> None:
    """A valid token for atlas-evil/x from an issuer limited to namespace atlas is invalid-publisher."""
    gateway = await make_gateway(
        {"cern": gitlab_issuer(other_issuer, namespaces=["atlas"])},
        [publisher(issuer="cern", repository="atlas/x")],
    )
    response = await gateway.mint(other_issuer.gitlab_token(project_path="atlas-evil/x"))
    assert_refused(response, "invalid-publisher", "outside the namespaces")


# --- claims and identity -----------------------------------------------------------------------------------------


def test_every_claim_gitlab_sends_is_classified(issuer: TestIssuer) -> None:
    """Every claim of a realistic GitLab token (with an environment) is a known claim of the GitLab kind."""
    claims = issuer.gitlab_claims(environment="release")
    assert set(claims) - GITLAB.known_claims(Issuer(name="gitlab-com", url=issuer.url, kind="gitlab")) == set()


def test_claim_tables_are_disjoint() -> None:
    """No claim is classified twice among REQUIRED, OPTIONAL, NULLABLE and UNCHECKED."""
    tables = {
        "REQUIRED": set(gitlab.REQUIRED),
        "OPTIONAL": set(gitlab.OPTIONAL),
        "NULLABLE": set(gitlab.NULLABLE),
        "UNCHECKED": set(gitlab.UNCHECKED),
    }
    names = list(tables)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert tables[first].isdisjoint(tables[second]), (first, second, tables[first] & tables[second])


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        pytest.param("project_path", DELETE, id="missing-project-path"),
        pytest.param("namespace_id", 12885807, id="namespace-id-as-int"),
        pytest.param("ref_protected", True, id="ref-protected-as-bool"),
        pytest.param("ci_config_ref_uri", 7, id="ci-config-ref-uri-as-int"),
        pytest.param("environment", ["release"], id="environment-as-list"),
    ],
)
async def test_gitlab_claim_types_are_checked(gateway: Gateway, issuer: TestIssuer, claim: str, value: Any) -> None:
    """A missing required GitLab claim or one of the wrong JSON type is invalid-token naming the claim."""
    # Set after building the claims, so that the test issuer's derived claims (deployment_tier) stay well formed.
    claims = issuer.gitlab_claims()
    if value is DELETE:
        del claims[claim]
    else:
        claims[claim] = value
    response = await gateway.mint(issuer.sign(claims))
    assert_refused(response, "invalid-token", claim)


async def minted_claims(gateway: Gateway, token: str) -> dict[str, Any]:
    response = await gateway.mint(token)
    assert response.status_code == 200, response.text
    keys = KeySet.import_key_set((await gateway.client.get("/.well-known/jwks.json")).json())
    return dict(jwt.decode(response.json()["token"], keys, algorithms=["ES256"]).claims)


async def test_minted_identity_has_normalized_gitlab_fields(gateway: Gateway, issuer: TestIssuer) -> None:
    """The minted token carries the identity built from the GitLab claims, with protected_ref as a bool."""
    claims = await minted_claims(gateway, issuer.gitlab_token(environment="production", ref="v1.0", ref_type="tag"))
    assert claims["sub"] == "gitlab-com:group/project"
    assert claims["identity"] == {
        "issuer": "gitlab-com",
        "issuer_url": issuer.url,
        "kind": "gitlab",
        "repository": "group/project",
        "repository_id": "61254376",
        "owner": "group",
        "owner_id": "12885807",
        "workflow": ".gitlab-ci.yml",
        "ref": "v1.0",
        "ref_path": "refs/tags/v1.0",
        "ref_type": "tag",
        "sha": SHA,
        "environment": "production",
        "trigger": "push",
        "run_id": "1873420561",
        "actor": "alice",
        "runner_environment": "gitlab-hosted",
        "visibility": "public",
        "protected_ref": True,
    }


@pytest.mark.parametrize(
    ("ref_protected", "expected"),
    [
        pytest.param("false", False, id="false"),
        pytest.param(DELETE, None, id="absent"),
    ],
)
async def test_minted_identity_protected_ref(
    gateway: Gateway, issuer: TestIssuer, ref_protected: Any, expected: bool | None
) -> None:
    """ref_protected "false" becomes protected_ref false, and an absent claim becomes null, never true."""
    claims = await minted_claims(gateway, issuer.gitlab_token(ref_protected=ref_protected))
    assert claims["identity"]["protected_ref"] is expected
    assert claims["identity"]["environment"] is None
