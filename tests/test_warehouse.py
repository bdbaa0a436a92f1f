"""Warehouse parity: PyPI's own GitLab and GitHub trusted-publisher test cases, replayed against the gateway.

Each row restates one case of Warehouse's `tests/unit/oidc/models/test_gitlab.py` or `test_github.py` (pypi/warehouse)
in our terms: the claims a real token would carry, the publishers registered, and the gateway's answer over HTTP.
The row's id and `mirrors` say which Warehouse behaviour it replays. Where the gateway answers differently on
purpose, `differs` says why; README.md ("Differences from PyPI") documents each of those.

Tokens are really signed by the HTTPS test issuer and minted through the app; nothing is mocked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.issuers import github, gitlab
from gateway.testing import DELETE, TestIssuer
from tests.conftest import Gateway, description, error_code

SUCCESS = "success"
PUBLISHER_MISS = "invalid-publisher"
BAD_TOKEN = "invalid-token"
SHA = "a3f1c9e07b52d48e6f0c2b9d17e4a85c3b6d0f92"


@dataclass(frozen=True)
class Row:
    mirrors: str
    # Claim overrides on a realistic token; "{host}" in a string becomes the issuer's host and path.
    claims: Mapping[str, Any]
    # The publishers registered, as overrides on the kind's default publisher; each grants its own project.
    publishers: Sequence[Mapping[str, Any]] = ({},)
    outcome: str = SUCCESS
    # On success: the workflow the minted identity names, and which publishers' projects were granted.
    workflow: str | None = None
    granted: Sequence[int] = (0,)
    # Why the gateway deliberately answers otherwise than Warehouse (None: the same answer).
    differs: str | None = field(default=None)


def row(id: str, *args: Any, **kwargs: Any) -> Any:
    return pytest.param(Row(*args, **kwargs), id=id)


def expand(value: Any, issuer: TestIssuer) -> Any:
    return value.replace("{host}", f"{issuer.host}{issuer.path}") if isinstance(value, str) else value


async def replay(make_gateway: Any, issuer: TestIssuer, kind: str, base: Mapping[str, Any], case: Row) -> None:
    """Register the row's publishers, mint its token over HTTP, and check the gateway's answer."""
    issuers = {f"{kind}-test": {"url": issuer.url, "kind": kind, "ca_bundle": str(issuer.ca_path)}}
    publishers = [
        dict(base) | {"issuer": f"{kind}-test", "projects": [f"project-{n}"]} | dict(overrides)
        for n, overrides in enumerate(case.publishers)
    ]
    gateway: Gateway = await make_gateway(issuers, publishers)
    claims = {name: expand(value, issuer) for name, value in case.claims.items()}
    token = issuer.gitlab_token(**claims) if kind == "gitlab" else issuer.github_token(**claims)
    response = await gateway.mint(token)
    # Failure messages name the Warehouse behaviour the row replays.
    said = f"{case.mirrors}: {response.text}"
    if case.outcome != SUCCESS:
        assert response.status_code == 422, said
        assert error_code(response) == case.outcome, f"{case.mirrors}: {description(response)}"
        return
    assert response.status_code == 200, said
    assert response.json()["projects"] == [f"project-{n}" for n in case.granted]
    minted = jwt.decode(
        response.json()["token"], KeySet.import_key_set((await gateway.client.get("/.well-known/jwks.json")).json())
    ).claims
    if case.workflow is not None:
        assert minted["identity"]["workflow"] == case.workflow


# --- GitLab ---------------------------------------------------------------------------------------------------------

GITLAB_PUBLISHER = {"repository": "foo/bar", "workflow": "workflows/baz.yml"}


def ci(tail: str, project: str = "foo/bar") -> dict[str, Any]:
    """Claims for project `project` whose ci_config_ref_uri ends `//{tail}`."""
    return {"project_path": project, "ci_config_ref_uri": f"{{host}}/{project}//{tail}"}


def config_path(path: str) -> Any:
    """Warehouse extracts `path` as the CI config path: the gateway mints for a publisher registered with it."""
    return row(
        f"gitlab-config-path:{path}",
        f"test_extract_workflow_filename: {path!r} is the config path",
        ci(f"{path}@refs/heads/main"),
        [{"workflow": path}],
        workflow=path,
    )


NOT_YAML = "Warehouse requires a .yml/.yaml file name; GitLab does not, and a publisher names the path exactly"

GITLAB_ROWS = [
    # test_extract_workflow_filename: well-formed paths, "obnoxious" ones included.
    *(
        config_path(path)
        for path in (
            "notnested.yml",
            "notnested.yaml",
            "basic/basic.yml",
            "more/nested/example.yml",
            "too//many//slashes.yml",
            "has-@.yml",
            "foo.bar.yml",
            "foo.yml.bar.yml",
            "foo.yml@bar.yml",
            "@foo.yml@bar.yml",
            "@.yml.foo.yml@bar.yml",
            "a.yml",
            "a/b.yml",
        )
    ),
    # test_extract_workflow_filename: paths Warehouse cannot extract. None matches a publisher of another path.
    row(
        "gitlab-config-path-empty",
        "test_extract_workflow_filename: an empty config path is refused",
        ci("@refs/heads/main"),
        [{}, {"workflow": ".gitlab-ci.yml"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-config-path-wrong-suffix",
        "test_extract_workflow_filename: 'notnested.wrongsuffix' is refused",
        ci("notnested.wrongsuffix@refs/heads/main"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-config-path-wrong-suffix-registered",
        "test_extract_workflow_filename: 'notnested.wrongsuffix' is refused even when registered",
        ci("notnested.wrongsuffix@refs/heads/main"),
        [{"workflow": "notnested.wrongsuffix"}],
        workflow="notnested.wrongsuffix",
        differs=NOT_YAML,
    ),
    row(
        "gitlab-config-path-bare-yml",
        "test_extract_workflow_filename: '.yml' is refused",
        ci(".yml@refs/heads/main"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-config-path-bare-yaml",
        "test_extract_workflow_filename: '.yaml' is refused",
        ci(".yaml@refs/heads/main"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-config-path-dir-bare-yaml",
        "test_extract_workflow_filename / test_lookup_fails_invalid_ci_config_ref_uri: 'somedir/.yaml' is refused",
        ci("somedir/.yaml@refs/heads/main"),
        outcome=PUBLISHER_MISS,
    ),
    # test_gitlab_publisher_ci_config_ref_uri: the pin after the config path is the job's ref_path or sha.
    row(
        "gitlab-pin-tag",
        "ci_config_ref_uri: pinned to ref_path refs/tags/v0.0.1",
        ci("workflows/baz.yml@refs/tags/v0.0.1") | {"ref_path": "refs/tags/v0.0.1"},
        workflow="workflows/baz.yml",
    ),
    row(
        "gitlab-pin-pulls",
        "ci_config_ref_uri: pinned to ref_path refs/pulls/6",
        ci("workflows/baz.yml@refs/pulls/6") | {"ref_path": "refs/pulls/6"},
        workflow="workflows/baz.yml",
    ),
    row(
        "gitlab-pin-branch",
        "ci_config_ref_uri: pinned to ref_path refs/heads/main",
        ci("workflows/baz.yml@refs/heads/main"),
        workflow="workflows/baz.yml",
    ),
    row(
        "gitlab-pin-no-slash",
        "ci_config_ref_uri: pinned to ref_path 'notrailingslash'",
        ci("workflows/baz.yml@notrailingslash") | {"ref_path": "notrailingslash"},
        workflow="workflows/baz.yml",
    ),
    row(
        "gitlab-pin-sha",
        "ci_config_ref_uri: pinned to the sha, ref_path being another ref",
        ci(f"workflows/baz.yml@{SHA}") | {"ref_path": "someref"},
        workflow="workflows/baz.yml",
    ),
    row(
        "gitlab-pin-sha-ref_path-absent",
        "ci_config_ref_uri: refused when ref_path is absent, even pinned to the sha",
        ci(f"workflows/baz.yml@{SHA}") | {"ref_path": DELETE},
        workflow="workflows/baz.yml",
        differs="Warehouse wants both ref_path and sha; the gateway lets the sha pin (older GitLab sends no ref_path)",
    ),
    row(
        "gitlab-pin-sha-ref_path-empty",
        "ci_config_ref_uri: refused when ref_path is empty, even pinned to the sha",
        ci(f"workflows/baz.yml@{SHA}") | {"ref_path": ""},
        workflow="workflows/baz.yml",
        differs="Warehouse wants both ref_path and sha; the gateway lets the non-empty one pin (empty ones never do)",
    ),
    row(
        "gitlab-pin-missing-sha-absent",
        "ci_config_ref_uri: refused, sha absent and the pin not the ref_path",
        ci("workflows/baz.yml@missing") | {"ref_path": "someref", "sha": DELETE},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-pin-missing-sha-empty",
        "ci_config_ref_uri: refused, sha empty and the pin not the ref_path",
        ci("workflows/baz.yml@missing") | {"ref_path": "someref", "sha": ""},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-pin-both-absent",
        "ci_config_ref_uri: refused, ref_path and sha both absent",
        ci("workflows/baz.yml@missing") | {"ref_path": DELETE, "sha": DELETE},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-pin-both-empty",
        "ci_config_ref_uri: refused, ref_path and sha both empty",
        ci("workflows/baz.yml@missing") | {"ref_path": "", "sha": ""},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-pin-both-empty-empty-pin",
        "ci_config_ref_uri: an empty pin never matches empty claims",
        ci("workflows/baz.yml@") | {"ref_path": "", "sha": ""},
        outcome=PUBLISHER_MISS,
    ),
    # test_gitlab_publisher_ci_config_ref_uri: impersonations and partial values are all refused.
    row(
        "gitlab-impersonation-fake-yml",
        "ci_config_ref_uri: 'baz.yml@fake.yml@<sha>' does not name baz.yml",
        ci(f"workflows/baz.yml@fake.yml@{SHA}"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-impersonation-fake-yml-ref",
        "ci_config_ref_uri: 'baz.yml@fake.yml@refs/pulls/6' is refused",
        ci("workflows/baz.yml@fake.yml@refs/pulls/6") | {"ref_path": "refs/pulls/6"},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-partial-empty-pin",
        "ci_config_ref_uri: 'baz.yml@' is refused",
        ci("workflows/baz.yml@"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-partial-directory-pin",
        "ci_config_ref_uri: 'workflows/@' is refused",
        ci("workflows/@"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-partial-no-pin", "ci_config_ref_uri: 'workflows/' is refused", ci("workflows/"), outcome=PUBLISHER_MISS
    ),
    row(
        "gitlab-partial-file-only",
        "ci_config_ref_uri: a bare 'baz.yml' is refused",
        {"project_path": "foo/bar", "ci_config_ref_uri": "baz.yml"},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-partial-malicious-yml",
        "ci_config_ref_uri: 'baz.yml@malicious.yml@' is refused",
        ci("workflows/baz.yml@malicious.yml@"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-partial-double-at",
        "ci_config_ref_uri: 'baz.yml@@' is refused",
        ci("workflows/baz.yml@@"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-empty-uri",
        "ci_config_ref_uri: an empty claim is refused",
        {"project_path": "foo/bar", "ci_config_ref_uri": ""},
        outcome=PUBLISHER_MISS,
    ),
    # A branch name may hold "@" as the config path may (Warehouse compares the whole expected string).
    row(
        "gitlab-branch-with-at",
        "ci_config_ref_uri: compared whole, so a branch 'rel@1' is accepted",
        ci("workflows/baz.yml@refs/heads/rel@1") | {"ref": "rel@1"},
        workflow="workflows/baz.yml",
    ),
    # test_check_project_path / test_lookup_succeeds_with_mixed_case_project_path: case-insensitive, never empty.
    *(
        row(
            f"gitlab-project-case:{registered}~{claimed}",
            f"test_check_project_path: {registered!r} matches a token for {claimed!r}",
            ci("workflows/baz.yml@refs/heads/main", project=claimed),
            [{"repository": registered}],
        )
        for registered, claimed in (
            ("foo/bar", "Foo/bar"),
            ("Foo/bar", "foo/bar"),
            ("FOO/bar", "foo/bar"),
            ("foo/bar", "FOO/bar"),
            ("foo/Bar", "Foo/Bar"),
            ("foo/BAR", "foo/bar"),
            ("Foo/Bar", "foo/bar"),
        )
    ),
    row(
        "gitlab-project-empty",
        "test_check_project_path: an empty project_path never matches",
        ci("workflows/baz.yml@refs/heads/main", project=""),
        outcome=PUBLISHER_MISS,
    ),
    # test_gitlab_publisher_environment_claim / test_lookup_*_environment: exact and case-sensitive when registered.
    row(
        "gitlab-env-none-none",
        "environment: an unbound publisher accepts a token without one",
        ci("workflows/baz.yml@refs/heads/main"),
    ),
    row(
        "gitlab-env-none-empty",
        "environment: an unbound publisher accepts an empty one",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": ""},
    ),
    row(
        "gitlab-env-none-some",
        "environment: an unbound publisher accepts any",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "some-environment"},
    ),
    row(
        "gitlab-env-same",
        "environment: the registered one matches",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "some-environment"},
        [{"environment": "some-environment"}],
    ),
    row(
        "gitlab-env-upper-case-registered",
        "test_lookup_succeeds_with_non_lowercase_environment",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "SOME_ENVIRONMENT"},
        [{"environment": "SOME_ENVIRONMENT"}],
    ),
    row(
        "gitlab-env-case-differs",
        "environment: compared case-sensitively",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "sOmE-eNvIrOnMeNt"},
        [{"environment": "some-environment"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-env-lowercase-registered",
        "test_lookup_is_case_sensitive_for_environment",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "SomeEnvironment"},
        [{"environment": "someenvironment"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-env-registered-token-none",
        "environment: a bound publisher refuses a token without one",
        ci("workflows/baz.yml@refs/heads/main"),
        [{"environment": "some-environment"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-env-other",
        "environment: another environment is refused",
        ci("workflows/baz.yml@refs/heads/main") | {"environment": "some-other-environment"},
        [{"environment": "some-environment"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "gitlab-no-matching-publisher",
        "test_lookup_no_matching_publisher",
        ci(".gitlab-ci.yml@refs/heads/main"),
        outcome=PUBLISHER_MISS,
    ),
    # test_lookup_escapes: paths are compared as text, with no wildcard ('_', '%') of a database LIKE.
    *(
        row(
            f"gitlab-escapes:{ran}",
            f"test_lookup_escapes: {ran!r} picks its own publisher, not {other!r}",
            ci(f"{ran}@refs/heads/main") | extra,
            [{"workflow": a} | bound for a in (ran, other)],
            workflow=ran,
        )
        for ran, other in (
            ("workflows/release_pypi/ci.yml", "workflows/release-pypi/ci.yml"),
            ("workflows/release-pypi/ci.yml", "workflows/release_pypi/ci.yml"),
            ("workflows/release%pypi/ci.yml", "workflows/release-pypi/ci.yml"),
            ("workflows/release-pypi/ci.yml", "workflows/release%pypi/ci.yml"),
        )
        for extra, bound in (({}, {}), ({"environment": "some_environment"}, {"environment": "some_environment"}))
    ),
    # test_check_sub / test_gitlab_publisher_sub_claim / test_gitlab_publisher_missing_claims.
    row(
        "gitlab-sub-other-project",
        "sub: Warehouse refuses a sub naming another project",
        ci("workflows/baz.yml@refs/heads/main") | {"sub": "project_path:evil/project:ref_type:branch:ref:main"},
        differs="sub is unchecked: GitLab derives it from project_path, which is checked",
    ),
    row(
        "gitlab-sub-absent",
        "test_gitlab_publisher_missing_claims: Warehouse refuses a token without sub",
        ci("workflows/baz.yml@refs/heads/main") | {"sub": DELETE},
        differs="sub is unchecked: GitLab derives it from project_path, which is checked",
    ),
    row(
        "gitlab-missing-project_path",
        "test_gitlab_publisher_missing_claims: project_path is required",
        ci("workflows/baz.yml@refs/heads/main") | {"project_path": DELETE},
        outcome=BAD_TOKEN,
    ),
    row(
        "gitlab-missing-ci_config_ref_uri",
        "test_gitlab_publisher_missing_claims: ci_config_ref_uri is required",
        {"project_path": "foo/bar", "ci_config_ref_uri": DELETE},
        outcome=BAD_TOKEN,
    ),
]


@pytest.mark.parametrize("case", GITLAB_ROWS)
async def test_gitlab_publisher_cases(case: Row, make_gateway: Any, issuer: TestIssuer) -> None:
    """Each of Warehouse's GitLab publisher cases gets the gateway's answer stated in its row."""
    await replay(make_gateway, issuer, "gitlab", GITLAB_PUBLISHER, case)


# Claims Warehouse's GitLab publisher knows (test_gitlab_publisher_all_known_claims), as GitLab documents them.
WAREHOUSE_GITLAB_CLAIMS = """
    sub project_path ci_config_ref_uri ref_path sha environment iss iat nbf exp aud jti project_id namespace_id
    namespace_path user_id user_login user_email user_identities pipeline_id pipeline_source job_id ref ref_type
    ref_protected environment_protected deployment_tier environment_action runner_id runner_environment
    ci_config_sha project_visibility user_access_level groups_direct job_namespace_id job_namespace_path
    job_project_id job_project_path job_source
""".split()  # noqa: SIM905 (a word list reads better than quoted names)


def test_every_claim_warehouse_knows_for_gitlab_is_classified() -> None:
    """Every GitLab claim Warehouse classifies is classified by the gateway's gitlab kind too (used or ignored)."""
    assert set(WAREHOUSE_GITLAB_CLAIMS) - gitlab.KNOWN == set()


# --- GitHub ---------------------------------------------------------------------------------------------------------

GITHUB_PUBLISHER = {"repository": "foo/bar", "workflow": "baz.yml"}


def wf(rest: str) -> dict[str, Any]:
    """Claims for repository foo/bar whose workflow (and job workflow) ref is `.github/workflows/{rest}`."""
    ref = f"foo/bar/.github/workflows/{rest}"
    return {"repository": "foo/bar", "workflow_ref": ref, "job_workflow_ref": ref}


def workflow_file(name: str, ref: str = "refs/heads/main") -> Any:
    return row(
        f"github-workflow-file:{name}@{ref}",
        f"test_extract_workflow_filename: {name!r} is the workflow file",
        wf(f"{name}@{ref}") | {"ref": ref},
        [{"workflow": name}],
        workflow=name,
    )


RUN_AT_SHA = "5f3c2a9d8e7b6a1c0f4e3d2c1b0a9f8e7d6c5b4a"  # the test issuer's GitHub sha

GITHUB_ROWS = [
    # test_extract_workflow_filename: well-formed refs, "exceedingly obnoxious" ones included.
    *(
        workflow_file(name)
        for name in (
            "basic.yml",
            "basic.yaml",
            "has-dash.yml",
            "has--dashes.yml",
            "has--dashes-.yml",
            "has.period.yml",
            "has..periods.yml",
            "has..periods..yml",
            "has_underscore.yml",
            "nested@evil.yml",
            "nested.yml@evil.yml",
            "extra@nested.yml@evil.yml",
            "extra.yml@nested.yml@evil.yml",
            "foo.yml.yml",
            "foo.yml.foo.yml",
        )
    ),
    workflow_file("basic.yml", "refs/heads/misleading@branch.yml"),
    workflow_file("basic.yml", "refs/heads/bad@branch@twomatches.yml"),
    # test_extract_workflow_filename / test_lookup_fails_invalid_workflow_ref: malformed refs are refused.
    *(
        row(
            f"github-malformed:{rest}",
            f"test_extract_workflow_filename: {rest!r} is refused",
            wf(rest),
            [{}, {"workflow": "basic.yml"}],
            outcome=PUBLISHER_MISS,
        )
        for rest in (
            "basic.wrongsuffix@refs/heads/main",
            "@refs/heads/main",
            "nosuffix@refs/heads/main",
            ".yml@refs/heads/main",
            ".yaml@refs/heads/main",
            "main.yml",
        )
    ),
    # test_github_publisher_job_workflow_ref: the pin is the run's ref or sha.
    row(
        "github-pin-tag",
        "job_workflow_ref: pinned to ref refs/tags/v0.0.1",
        wf("baz.yml@refs/tags/v0.0.1") | {"ref": "refs/tags/v0.0.1"},
        workflow="baz.yml",
    ),
    row(
        "github-pin-pulls",
        "job_workflow_ref: pinned to ref refs/pulls/6",
        wf("baz.yml@refs/pulls/6") | {"ref": "refs/pulls/6"},
        workflow="baz.yml",
    ),
    row(
        "github-pin-branch",
        "job_workflow_ref: pinned to ref refs/heads/main",
        wf("baz.yml@refs/heads/main"),
        workflow="baz.yml",
    ),
    row(
        "github-pin-no-slash",
        "job_workflow_ref: pinned to ref 'notrailingslash'",
        wf("baz.yml@notrailingslash") | {"ref": "notrailingslash"},
        workflow="baz.yml",
    ),
    row(
        "github-pin-sha",
        "job_workflow_ref: pinned to the sha, the ref being another",
        wf(f"baz.yml@{RUN_AT_SHA}") | {"ref": "someref"},
        workflow="baz.yml",
    ),
    row(
        "github-pin-sha-ref-empty",
        "job_workflow_ref: pinned to the sha, the ref empty",
        wf(f"baz.yml@{RUN_AT_SHA}") | {"ref": ""},
        workflow="baz.yml",
    ),
    row(
        "github-pin-both-empty",
        "job_workflow_ref: refused, ref and sha both empty",
        wf("baz.yml@missing") | {"ref": "", "sha": ""},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-pin-both-empty-empty-pin",
        "job_workflow_ref: an empty pin never matches empty claims",
        wf("baz.yml@") | {"ref": "", "sha": ""},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-impersonation-fake-yml",
        "job_workflow_ref: 'baz.yml@fake.yml@<ref>' does not name baz.yml",
        wf("baz.yml@fake.yml@notrailingslash") | {"ref": "notrailingslash"},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-impersonation-fake-yml-pulls",
        "job_workflow_ref: 'baz.yml@fake.yml@refs/pulls/6' is refused",
        wf("baz.yml@fake.yml@refs/pulls/6") | {"ref": "refs/pulls/6"},
        outcome=PUBLISHER_MISS,
    ),
    row("github-partial-empty-pin", "job_workflow_ref: 'baz.yml@' is refused", wf("baz.yml@"), outcome=PUBLISHER_MISS),
    row(
        "github-partial-no-file", "job_workflow_ref: '.github/workflows/@' is refused", wf("@"), outcome=PUBLISHER_MISS
    ),
    row("github-partial-no-pin", "job_workflow_ref: '.github/workflows/' is refused", wf(""), outcome=PUBLISHER_MISS),
    row(
        "github-partial-file-only",
        "job_workflow_ref: a bare 'baz.yml' is refused",
        {"repository": "foo/bar", "workflow_ref": "baz.yml", "job_workflow_ref": "baz.yml"},
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-partial-malicious-yml",
        "job_workflow_ref: 'baz.yml@malicious.yml@' is refused",
        wf("baz.yml@malicious.yml@"),
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-partial-double-at", "job_workflow_ref: 'baz.yml@@' is refused", wf("baz.yml@@"), outcome=PUBLISHER_MISS
    ),
    row(
        "github-empty-ref-claim",
        "job_workflow_ref: an empty claim is refused",
        {"repository": "foo/bar", "workflow_ref": "", "job_workflow_ref": ""},
        outcome=PUBLISHER_MISS,
    ),
    # test_check_repository: case-insensitive.
    *(
        row(
            f"github-repository-case:{registered}~{claimed}",
            f"test_check_repository: {registered!r} matches a token for {claimed!r}",
            wf("baz.yml@refs/heads/main")
            | {"repository": claimed, "workflow_ref": f"{claimed}/.github/workflows/baz.yml@refs/heads/main"},
            [{"repository": registered}],
        )
        for registered, claimed in (("Foo/bar", "foo/bar"), ("foo/bar", "Foo/bar"), ("FOO/bar", "foo/BAR"))
    ),
    # test_check_event_name_invalid.
    row(
        "github-pull-request-target",
        "event_name: pull_request_target is refused",
        wf("baz.yml@refs/heads/main") | {"event_name": "pull_request_target"},
        outcome=PUBLISHER_MISS,
    ),
    # test_github_publisher_environment_claim: GitHub environments compare case-insensitively.
    row(
        "github-env-none-none",
        "environment: an unbound publisher accepts a token without one",
        wf("baz.yml@refs/heads/main"),
    ),
    row(
        "github-env-none-empty",
        "environment: an unbound publisher accepts an empty one",
        wf("baz.yml@refs/heads/main") | {"environment": ""},
    ),
    row(
        "github-env-none-some",
        "environment: an unbound publisher accepts any",
        wf("baz.yml@refs/heads/main") | {"environment": "some-environment"},
    ),
    row(
        "github-env-same",
        "environment: the registered one matches",
        wf("baz.yml@refs/heads/main") | {"environment": "some-environment"},
        [{"environment": "some-environment"}],
    ),
    row(
        "github-env-case-differs",
        "environment: compared case-insensitively",
        wf("baz.yml@refs/heads/main") | {"environment": "sOmE-eNvIrOnMeNt"},
        [{"environment": "some-environment"}],
    ),
    row(
        "github-env-registered-token-none",
        "environment: a bound publisher refuses a token without one",
        wf("baz.yml@refs/heads/main"),
        [{"environment": "some-environment"}],
        outcome=PUBLISHER_MISS,
    ),
    row(
        "github-env-other",
        "environment: another environment is refused (test_lookup_no_matching_publishers)",
        wf("baz.yml@refs/heads/main") | {"environment": "another_environment"},
        [{"environment": "environment"}],
        outcome=PUBLISHER_MISS,
    ),
    # test_lookup_escapes.
    *(
        row(
            f"github-escapes:{ran}",
            f"test_lookup_escapes: {ran!r} picks its own publisher, not {other!r}",
            wf(f"{ran}@refs/heads/main") | extra,
            [{"workflow": a} | bound for a in (ran, other)],
            workflow=ran,
        )
        for ran, other in (
            ("release_pypi.yml", "release-pypi.yml"),
            ("release-pypi.yml", "release_pypi.yml"),
            ("release%pypi.yml", "release-pypi.yml"),
            ("release-pypi.yml", "release%pypi.yml"),
        )
        for extra, bound in (({}, {}), ({"environment": "some_environment"}, {"environment": "some_environment"}))
    ),
    # repository_owner_id: Warehouse always compares it with the registered owner's id; here it is an optional pin.
    row(
        "github-owner-id-pinned-equal",
        "repository_owner_id equals the registered owner's id",
        wf("baz.yml@refs/heads/main") | {"repository_owner_id": "1234"},
        [{"owner_id": "1234"}],
    ),
    row(
        "github-owner-id-pinned-other",
        "repository_owner_id differs from the registered owner's id",
        wf("baz.yml@refs/heads/main") | {"repository_owner_id": "9999"},
        [{"owner_id": "1234"}],
        outcome=PUBLISHER_MISS,
    ),
    # Reusable workflows: Warehouse matches job_workflow_ref (the called file), the gateway workflow_ref (the caller).
    row(
        "github-reusable-caller-registered",
        "job_workflow_ref: Warehouse refuses a publisher registered with the caller's file",
        {
            "repository": "foo/bar",
            "workflow_ref": "foo/bar/.github/workflows/baz.yml@refs/heads/main",
            "job_workflow_ref": "foo/bar/.github/workflows/build.yml@refs/heads/main",
        },
        workflow="baz.yml",
        differs="reusable workflows match the caller (workflow_ref); see the migration note",
    ),
    row(
        "github-reusable-called-registered",
        "job_workflow_ref: Warehouse accepts a publisher registered with the called file",
        {
            "repository": "foo/bar",
            "workflow_ref": "foo/bar/.github/workflows/baz.yml@refs/heads/main",
            "job_workflow_ref": "foo/bar/.github/workflows/build.yml@refs/heads/main",
        },
        [{"workflow": "build.yml"}],
        outcome=PUBLISHER_MISS,
        differs="reusable workflows match the caller (workflow_ref); see the migration note",
    ),
]


@pytest.mark.parametrize("case", GITHUB_ROWS)
async def test_github_publisher_cases(case: Row, make_gateway: Any, issuer: TestIssuer) -> None:
    """Each of Warehouse's GitHub publisher cases gets the gateway's answer stated in its row."""
    await replay(make_gateway, issuer, "github", GITHUB_PUBLISHER, case)


# Claims Warehouse's GitHub publisher knows (test_github_publisher_all_known_claims), as GitHub documents them.
WAREHOUSE_GITHUB_CLAIMS = """
    repository repository_owner repository_owner_id job_workflow_ref ref sha environment iss iat nbf exp aud jti
    sub actor actor_id run_id run_number run_attempt head_ref base_ref event_name ref_type repository_id workflow
    repository_visibility workflow_sha job_workflow_sha workflow_ref runner_environment environment_node_id
    enterprise enterprise_id ref_protected check_run_id
""".split()  # noqa: SIM905 (a word list reads better than quoted names)


def test_every_claim_warehouse_knows_for_github_is_classified() -> None:
    """Every GitHub claim Warehouse classifies is classified by the gateway's github kind too (used or ignored)."""
    assert set(WAREHOUSE_GITHUB_CLAIMS) - github.KNOWN == set()


def test_every_deliberate_difference_is_documented() -> None:
    """Each reason a row gives for differing from Warehouse is one the README's differences section explains."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Differences from PyPI", 1)[1].split("\n## ", 1)[0]
    reasons = {p.values[0].differs for p in GITLAB_ROWS + GITHUB_ROWS if p.values[0].differs}
    topics = {
        "sub is unchecked": "`sub`",
        "reusable workflows": "reusable",
        "ref_path and sha": "ref_path",
        ".yml/.yaml": ".yml",
    }
    for reason in reasons:
        topic = next(mark for key, mark in topics.items() if key in reason)
        assert topic in section, reason
