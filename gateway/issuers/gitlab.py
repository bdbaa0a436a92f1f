"""GitLab CI ID tokens (gitlab.com and self-hosted instances) -> Identity.

The claim tables are the whole of what we know GitLab sends; a test checks that every claim in a real token is
classified, so a claim GitLab adds is noticed rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidPublisher, InvalidToken
from ..identity import Identity
from ..publishers import Match, same_folded
from ..tables import Table
from .base import Issuer, Kind, check_claims

# Identity is built from these; each must be a string.
REQUIRED = {
    "project_path": str,
    "project_id": str,
    "namespace_path": str,
    "namespace_id": str,
    "ref": str,
    "ref_type": str,
    "pipeline_source": str,
    "pipeline_id": str,
}
# Used when present (GitLab versions differ in what they send).
OPTIONAL = {
    "ref_path": str,
    "ref_protected": str,
    "sha": str,
    "environment": str,
    "user_login": str,
    "runner_environment": str,
    "project_visibility": str,
    "job_project_path": str,
    # Read by require_protected_environment (check_match).
    "environment_protected": str,
}
# ci_config_ref_uri is required but may be null: null has a meaning (config from another project).
NULLABLE = {"ci_config_ref_uri": str}
# Known and deliberately not used for matching: either redundant with the above, about the person rather than
# the repository, or (sub) a project-configurable string that must not be trusted as a path.
UNCHECKED = frozenset(
    {
        "iss", "aud", "exp", "iat", "nbf", "jti", "sub",
        "user_id", "user_email", "user_access_level", "user_identities", "groups_direct",
        "job_id", "runner_id", "deployment_tier", "environment_action",
        "ci_config_sha", "job_project_id", "job_namespace_id", "job_namespace_path",
        "job_source", "job_policy_ref_uri", "job_policy_ref_sha",
    }
)  # fmt: skip


def _host_path(url: str) -> str:
    return url.split("://", 1)[1]


def _ref_path(claims: Mapping[str, Any]) -> str | None:
    if isinstance(claims.get("ref_path"), str):
        return claims["ref_path"]  # type: ignore[no-any-return]
    # GitLab before 16.x sends no ref_path; it is the ref under its type's namespace.
    prefix = {"branch": "refs/heads/", "tag": "refs/tags/"}.get(claims["ref_type"])
    return prefix + claims["ref"] if prefix and claims["ref"] else None


def workflow_from(issuer_url: str, claims: Mapping[str, Any], ref_path: str | None) -> str:
    """The CI config path, after checking that ci_config_ref_uri points into this very project and ref.

    GitLab builds it as `{host}/{project_path}//{config path}@{ref_path}` (or `@{sha}`). Every part is
    checked, because the config path is the only thing that says which pipeline definition the job ran.
    """
    uri = claims["ci_config_ref_uri"]
    project_path = claims["project_path"]
    if uri is None:
        raise InvalidPublisher(
            "ci_config_ref_uri is null: the job's CI configuration comes from another project or a remote "
            "include, so it cannot be pinned to a publisher; keep the CI config file in the repository"
        )
    host = _host_path(issuer_url) + "/"
    if not same_folded(uri[: len(host)], host):
        raise InvalidPublisher(f"ci_config_ref_uri does not point into this GitLab instance ({host.rstrip('/')})")
    project, sep, rest = uri[len(host) :].partition("//")
    if not sep or not project.isascii() or not same_folded(project, project_path):
        raise InvalidPublisher(
            f"ci_config_ref_uri names CI config of project {project!r}, not of {project_path!r}: the CI "
            "configuration must live in the publishing repository"
        )
    if "@" not in rest:
        raise InvalidPublisher("ci_config_ref_uri has no '<config path>@<ref>' part")
    # Both the config path and a branch name may contain "@" (`refs/heads/rel@1`), so the tail is compared with
    # the pins the job has (its ref_path, then its sha) rather than cut at an "@". An empty ref_path or sha pins
    # nothing: "…@" alone would otherwise match it.
    for pin in (ref_path, claims.get("sha")):
        if pin and rest.endswith("@" + pin):
            break
    else:
        raise InvalidPublisher(
            f"ci_config_ref_uri is pinned to {_tail(rest)}, which is neither the job's ref_path nor its sha"
        )
    workflow: str = rest[: -len(pin) - 1]
    if not workflow:
        raise InvalidPublisher("ci_config_ref_uri has no '<config path>@<ref>' part")
    return workflow


def _tail(rest: str) -> str:
    """What follows the last "@", for a message only (the split is not the meaning: both sides may hold "@")."""
    tail = rest.rpartition("@")[2]
    return repr(tail if len(tail) <= 300 else tail[:300] + "...")


def identity(issuer: Issuer, claims: Mapping[str, Any]) -> Identity:
    check_claims(claims, REQUIRED, OPTIONAL, NULLABLE)
    project_path = claims["project_path"]
    job_project_path = claims.get("job_project_path")
    if job_project_path is not None and not same_folded(job_project_path, project_path):
        raise InvalidPublisher(
            f"the job ran in project {job_project_path!r} but the token names {project_path!r} "
            "(a merge-request pipeline from a fork); publishing is refused"
        )
    if "ci_config_ref_uri" not in claims:
        raise InvalidToken("token is missing 'ci_config_ref_uri' (GitLab 16.2 and later send it)")
    protected = claims.get("ref_protected")
    ref_path = _ref_path(claims)
    get = claims.get
    # Positionally, in Identity's field order (each line names its field; the kind's tests check every field by
    # name): binding 19 keyword arguments costs a mint ~7,000 instructions more.
    return Identity(
        issuer.name,  # issuer
        issuer.url,  # issuer_url
        "gitlab",  # kind
        project_path,  # repository
        claims["project_id"],  # repository_id
        claims["namespace_path"],  # owner
        claims["namespace_id"],  # owner_id
        workflow_from(issuer.url, claims, ref_path),  # workflow
        claims["ref"],  # ref
        ref_path,  # ref_path
        claims["ref_type"],  # ref_type
        get("sha"),  # sha
        get("environment") or None,  # environment
        claims["pipeline_source"],  # trigger
        claims["pipeline_id"],  # run_id
        get("user_login"),  # actor
        get("runner_environment"),  # runner_environment
        get("project_visibility"),  # visibility
        None if protected is None else protected == "true",  # protected_ref
    )


KNOWN = frozenset(REQUIRED) | frozenset(OPTIONAL) | frozenset(NULLABLE) | UNCHECKED


@dataclass(frozen=True, slots=True)
class Options:
    # Jobs deploying to an environment a publisher names must deploy to a protected one (README, "Finer rules").
    require_protected_environment: bool = False


def options(t: Table) -> Options:
    return Options(require_protected_environment=t.get("require_protected_environment", bool, False))


def check_match(issuer: Issuer, claims: Mapping[str, Any], match: Match) -> None:
    """With `require_protected_environment`, an environment-bound match needs `environment_protected` "true".

    Refused outright rather than retried without the bound publishers: an unbound publisher of the same repository
    would otherwise catch exactly the jobs the operator meant to stop (anyone who can run a job in an unprotected
    environment of that name).
    """
    options = issuer.options if isinstance(issuer.options, Options) else Options()
    if not options.require_protected_environment:
        return
    bound = [publisher.environment for publisher in match.publishers if publisher.environment is not None]
    if bound and claims.get("environment_protected") != "true":
        raise InvalidPublisher(
            f"environment {claims.get('environment')!r} is not protected, and issuer {issuer.name!r} only publishes "
            "to environments a publisher names from protected environments (protect the environment in GitLab)"
        )


GITLAB = Kind(
    name="gitlab",
    identity=identity,
    environment_case_sensitive=True,
    known_claims=lambda issuer: KNOWN,
    options=options,
    check_match=check_match,
    match_claims=frozenset({"environment_protected"}),
)
