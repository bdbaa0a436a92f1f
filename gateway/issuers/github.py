"""GitHub Actions ID tokens (github.com, GitHub Enterprise Cloud and Server) -> Identity.

The issuer is whatever URL the operator configured, matched exactly against `iss` before this module runs:
`https://token.actions.githubusercontent.com` for github.com, `https://HOST/_services/token` for GitHub
Enterprise Server, `https://token.actions.githubusercontent.com/<enterprise>` for an Enterprise Cloud custom
issuer. The claims are the same for all of them.

Which workflow a publisher pins. `workflow` is the file name under `.github/workflows/` taken from `workflow_ref`
(`{owner}/{repo}/.github/workflows/{file}@{ref}`), which GitHub sets to the top-level workflow of the run: the
file in the publishing repository that the run started from. When that workflow calls a reusable workflow
(`jobs.<id>.uses: other/shared/.github/workflows/build.yml@v1`), the token minted inside the called workflow has
the caller in `workflow_ref` and the called file in `job_workflow_ref`, possibly in another repository. The
publisher matches the caller; `job_workflow_ref` is ignored. Why:

- The caller is the only workflow file that must live in the publishing repository, under its maintainers'
  branch rules and review. It chooses what to call, at which ref, with which inputs, and whether the called jobs
  may request an ID token at all (`permissions: id-token: write` is granted by the caller). Calling a reusable
  workflow is the caller trusting that code, exactly as a step trusts `uses: some/action@v1`; pinning the called
  file would add a name to match, not a party to trust.
- PyPI does the opposite: it matches `job_workflow_ref` and requires it to lie in the publishing repository, which
  is why publishing from a reusable workflow in another repository fails there (pypi/warehouse#11096). For a job
  that is not in a reusable workflow both claims are equal, so a publisher that works on PyPI works here too.
  The difference: here a caller that delegates publishing to a shared workflow can publish, and the shared
  workflow can publish only for repositories whose own top-level workflow calls it and is registered.
- The consequence to document for users: registering `release.yml` trusts every job `release.yml` runs,
  including the jobs of every reusable workflow it calls. To narrow it, bind the publisher to an environment
  with protection rules.

Refused outright: `pull_request_target` runs (they run with the base repository's privileges, including its ID
token, but are there to handle pull requests, and often check out the pull request's code), and a `workflow_ref`
that is not a `.yml`/`.yaml` file directly in this repository's `.github/workflows/` at the run's ref or sha.

`ref_protected` is not in GitHub's documented OIDC claim table, but real tokens carry it (it mirrors
`github.ref_protected`: "true" when branch protection or a ruleset applies to the ref). It feeds `protected_ref`;
a token without it has protected_ref None, which `require_protected_ref` refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidPublisher, InvalidToken
from ..identity import Identity
from ..publishers import fold, same_folded
from .base import Issuer, Kind, check_claims

# Identity is built from these; each must be a string. `ref` may be "" (a deployment of a bare sha), never absent.
REQUIRED = {
    "repository": str,
    "repository_id": str,
    "repository_owner": str,
    "repository_owner_id": str,
    "workflow_ref": str,
    "ref": str,
    "sha": str,
    "event_name": str,
    "run_id": str,
}
# Used when present (GitHub Enterprise Server versions differ in what they send).
OPTIONAL = {
    "ref_type": str,
    "ref_protected": str,
    "environment": str,
    "actor": str,
    "runner_environment": str,
    "repository_visibility": str,
}
# Known and deliberately not used: standard JWT claims (checked by the verifier), `sub` (a string a repository can
# customise, so never read as a path), `workflow` (the workflow's display name, which anyone can set), the called
# reusable workflow (see the module docstring), pull-request branches, counters and ids about the run or person
# rather than the repository, and the enterprise a repository belongs to.
UNCHECKED = frozenset(
    {
        "iss", "aud", "exp", "iat", "nbf", "jti", "sub",
        "workflow", "workflow_sha", "job_workflow_ref", "job_workflow_sha",
        "head_ref", "base_ref", "actor_id",
        "run_number", "run_attempt", "check_run_id", "environment_node_id",
        "enterprise", "enterprise_id",
    }
)  # fmt: skip

WORKFLOWS = "/.github/workflows/"
REFUSED_EVENTS = {
    "pull_request_target": (
        "the run was triggered by pull_request_target, which runs with this repository's privileges for a pull "
        "request (often on the pull request's code); publishing from it is refused, publish from a push, tag or "
        "release workflow instead"
    ),
}


def _show(value: str) -> str:
    return repr(value if len(value) <= 300 else value[:300] + "...")


def workflow_from(claims: Mapping[str, Any]) -> str:
    """The workflow file name, after checking that workflow_ref names a file directly in this repository's
    `.github/workflows/`, at the run's ref or sha.

    The repository part is compared case-insensitively (ASCII only, so a look-alike never folds onto it); the
    `.github/workflows/` part exactly, as it is the only directory GitHub runs workflows from.
    """
    workflow_ref: str = claims["workflow_ref"]
    repository: str = claims["repository"]
    head, rest = workflow_ref[: len(repository)], workflow_ref[len(repository) :]
    if not head.isascii() or not same_folded(head, repository) or not rest.startswith(WORKFLOWS):
        raise InvalidPublisher(
            f"workflow_ref {_show(workflow_ref)} does not name a workflow in .github/workflows/ of repository "
            f"{repository!r}: the workflow must live in the publishing repository"
        )
    rest = rest[len(WORKFLOWS) :]
    # Both the file name and a git ref may contain "@", so the pin is matched against the known ref and sha
    # rather than split on the last "@".
    pins = [f"@{value}" for value in (claims["ref"], claims["sha"]) if value]
    pin = next((pin for pin in pins if rest.endswith(pin)), None)
    if pin is None:
        raise InvalidPublisher(
            f"workflow_ref is pinned to {_show(rest.rpartition('@')[2])}, which is neither the run's ref nor its sha"
        )
    workflow = rest[: -len(pin)]
    if "/" in workflow:
        raise InvalidPublisher(
            f"workflow_ref names {_show(workflow)} below .github/workflows/; GitHub runs only files directly in it"
        )
    if not workflow.endswith((".yml", ".yaml")) or workflow in (".yml", ".yaml"):
        raise InvalidPublisher(f"workflow_ref names {_show(workflow)}, which is not a .yml or .yaml workflow file")
    return workflow


def _short_ref(ref: str, ref_type: str | None) -> str:
    # The Identity's ref is the branch or tag name, as GitLab's `ref` is; a ref GitHub types neither way, or one
    # under another namespace (refs/pull/N/merge is typed "branch"), stays whole.
    prefix = {"branch": "refs/heads/", "tag": "refs/tags/"}.get(ref_type or "")
    return ref[len(prefix) :] if prefix and ref.startswith(prefix) and len(ref) > len(prefix) else ref


def identity(issuer: Issuer, claims: Mapping[str, Any]) -> Identity:
    check_claims(claims, REQUIRED, OPTIONAL)
    repository: str = claims["repository"]
    owner, slash, name = repository.partition("/")
    if not slash or not owner or not name or "/" in name:
        raise InvalidToken(f"claim 'repository' must be 'owner/name', not {_show(repository)}")
    if (fold(owner) or owner) != (fold(claims["repository_owner"]) or claims["repository_owner"]):
        # owner_id pins repository_owner_id; it must describe the owner the repository path names.
        raise InvalidToken(
            f"claim 'repository_owner' {_show(claims['repository_owner'])} is not the owner of {repository!r}"
        )
    refused = REFUSED_EVENTS.get(claims["event_name"])
    if refused is not None:
        raise InvalidPublisher(refused)
    workflow = workflow_from(claims)
    ref_type = claims.get("ref_type") or None
    protected = claims.get("ref_protected")
    return Identity(
        issuer=issuer.name,
        issuer_url=issuer.url,
        kind="github",
        repository=repository,
        repository_id=claims["repository_id"],
        owner=claims["repository_owner"],
        owner_id=claims["repository_owner_id"],
        workflow=workflow,
        ref=_short_ref(claims["ref"], ref_type) or None,
        ref_path=claims["ref"] or None,
        ref_type=ref_type,
        sha=claims["sha"],
        environment=claims.get("environment") or None,
        trigger=claims["event_name"],
        run_id=claims["run_id"],
        actor=claims.get("actor"),
        runner_environment=claims.get("runner_environment"),
        visibility=claims.get("repository_visibility"),
        protected_ref=None if protected is None else protected == "true",
    )


KNOWN = frozenset(REQUIRED) | frozenset(OPTIONAL) | UNCHECKED

def workflow_problem(workflow: str) -> str | None:
    if "/" in workflow or not workflow.endswith((".yml", ".yaml")):
        return "for a github issuer, the file name under .github/workflows/, like 'release.yml'"
    return None


GITHUB = Kind(
    name="github",
    identity=identity,
    # GitHub environment names are case-insensitive: "Release" and "release" are one environment.
    environment_case_sensitive=False,
    known_claims=lambda issuer: KNOWN,
    workflow_problem=workflow_problem,
)
