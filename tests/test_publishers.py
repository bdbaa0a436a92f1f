"""Unit tests of gateway/publishers.py: names, the (issuer, repository) index, matching and its explanations."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidPublisher
from gateway.identity import Identity
from gateway.publishers import Publisher, Publishers, fold, normalize_project, same_folded, under_namespaces
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, description, error_code, gitlab_issuer


def identity(**fields: Any) -> Identity:
    base: dict[str, Any] = {
        "issuer": "gitlab-com",
        "issuer_url": "https://gitlab.com",
        "kind": "gitlab",
        "repository": "group/project",
        "owner_id": "12885807",
        "workflow": ".gitlab-ci.yml",
    }
    return Identity(**(base | fields))


def pub(**fields: Any) -> Publisher:
    base: dict[str, Any] = {
        "issuer": "gitlab-com",
        "repository": "group/project",
        "workflow": ".gitlab-ci.yml",
        "projects": ("sampleproject",),
    }
    return Publisher(**(base | fields))


def miss(publishers: Publishers, who: Identity, **kwargs: Any) -> str:
    with pytest.raises(InvalidPublisher) as raised:
        publishers.match(who, **kwargs)
    return raised.value.description


# --- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normalized"),
    [
        pytest.param("friendly-bard", "friendly-bard", id="already"),
        pytest.param("Friendly-Bard", "friendly-bard", id="mixed-case"),
        pytest.param("FRIENDLY-BARD", "friendly-bard", id="upper"),
        pytest.param("friendly.bard", "friendly-bard", id="dot"),
        pytest.param("friendly_bard", "friendly-bard", id="underscore"),
        pytest.param("friendly--bard", "friendly-bard", id="double-dash"),
        pytest.param("FrIeNdLy-._.-bArD", "friendly-bard", id="run-of-separators"),
        pytest.param("zope.interface", "zope-interface", id="dotted"),
        pytest.param("a", "a", id="single"),
    ],
)
def test_normalize_project_follows_pep_503(name: str, normalized: str) -> None:
    """Project names are lower-cased and each run of '-', '_' and '.' becomes one '-' (PEP 503)."""
    assert normalize_project(name) == normalized


@pytest.mark.parametrize(
    ("path", "folded"),
    [
        pytest.param("Group/Project", "group/project", id="ascii-upper"),
        pytest.param("group/sub/project", "group/sub/project", id="ascii-lower"),
        pytest.param("group/\u212ait", None, id="kelvin-sign"),
        pytest.param("group/pr\u043eject", None, id="cyrillic-o"),
        pytest.param("\uff47roup/project", None, id="fullwidth"),
        pytest.param("gro\u00dfe/project", None, id="sharp-s"),
    ],
)
def test_fold_lowercases_ascii_and_refuses_the_rest(path: str, folded: str | None) -> None:
    """fold lower-cases ASCII paths and returns None for any non-ASCII path, so it can never collide."""
    assert fold(path) == folded


def test_same_folded_is_fold_equality() -> None:
    """same_folded(a, b) answers fold(a) == fold(b) for every pair, identical non-ASCII strings included."""
    paths = ["group/project", "Group/Project", "GROUP/PROJECT", "group/projec\u212a", "group/project2", "", "g"]
    for a in paths:
        for b in paths:
            assert same_folded(a, b) == (fold(a) == fold(b)), (a, b)


@pytest.mark.parametrize(
    ("repository", "namespaces", "inside"),
    [
        pytest.param("atlas/x", ["atlas"], True, id="direct-child"),
        pytest.param("atlas/sub/x", ["atlas"], True, id="grandchild"),
        pytest.param("ATLAS/x", ["atlas"], True, id="repository-case"),
        pytest.param("atlas/x", ["ATLAS"], True, id="namespace-case"),
        pytest.param("cms-sw/x", ["atlas", "cms-sw"], True, id="second-namespace"),
        pytest.param("atlas/sub/x", ["atlas/sub"], True, id="nested-namespace"),
        pytest.param("atlas-evil/x", ["atlas"], False, id="hyphen-suffix"),
        pytest.param("atlasx/y", ["atlas"], False, id="letter-suffix"),
        pytest.param("xatlas/y", ["atlas"], False, id="prefix"),
        pytest.param("atlas", ["atlas"], False, id="namespace-itself"),
        pytest.param("atlas/subx/y", ["atlas/sub"], False, id="nested-suffix"),
        pytest.param("other/atlas/x", ["atlas"], False, id="not-first-segment"),
        pytest.param("\u0430tlas/x", ["atlas"], False, id="cyrillic-a"),
        pytest.param("atlas/x", [], False, id="no-namespaces"),
    ],
)
def test_under_namespaces_respects_segment_boundaries(repository: str, namespaces: list[str], inside: bool) -> None:
    """A repository is under a namespace only if the namespace is its leading path on a '/' boundary."""
    assert under_namespaces(repository, namespaces) is inside


# --- the index ---------------------------------------------------------------------------------------------------


def test_lookup_is_by_issuer_and_folded_repository() -> None:
    """Candidates are the publishers of the identity's issuer whose repository equals it case-insensitively."""
    mine = pub(repository="Group/Project")
    publishers = Publishers([mine, pub(issuer="cern")])
    assert publishers.candidates(identity(repository="group/PROJECT")) == (mine,)
    assert publishers.candidates(identity(issuer="elsewhere")) == ()


def test_candidates_never_include_other_repositories() -> None:
    """Look-alike, parent, child and prefix repositories are never candidates for a repository."""
    mine = pub()
    others = [
        pub(repository=path)
        for path in ("group/project-evil", "group/proj", "group/project/sub", "group", "other/project", "group/projec")
    ]
    publishers = Publishers([*others, mine])
    assert len(publishers) == 7
    assert publishers.candidates(identity()) == (mine,)


def test_non_ascii_identity_has_no_candidates() -> None:
    """An identity with a non-ASCII repository has no candidates, even if it lower-cases onto a registered one."""
    publishers = Publishers([pub(repository="group/kit")])
    assert publishers.candidates(identity(repository="group/\u212ait")) == ()
    assert "group/\u212ait" in miss(publishers, identity(repository="group/\u212ait"))


# --- matching ----------------------------------------------------------------------------------------------------


def test_matching_publishers_union_their_projects_without_duplicates() -> None:
    """All matching unbound publishers grant their projects, each project once and in registration order."""
    first = pub(projects=("a", "b"))
    second = pub(projects=("b", "c"))
    match = Publishers([first, second]).match(identity())
    assert match.publishers == (first, second)
    assert match.projects == ("a", "b", "c")


def test_bound_publisher_wins_only_when_it_matches() -> None:
    """A matching environment-bound publisher excludes unbound ones; a non-matching one leaves them in charge."""
    unbound = pub(projects=("a",))
    bound = pub(projects=("b",), environment="release")
    publishers = Publishers([unbound, bound])
    assert publishers.match(identity(environment="release")).projects == ("b",)
    assert publishers.match(identity(environment="staging")).projects == ("a",)
    assert publishers.match(identity()).publishers == (unbound,)


def test_environment_case_sensitivity_is_the_kinds_choice() -> None:
    """Environment comparison is exact by default and case-insensitive only when the kind says so."""
    publishers = Publishers([pub(environment="release")])
    assert "environment expected 'release', token has 'Release'" in miss(publishers, identity(environment="Release"))
    relaxed = publishers.match(identity(environment="Release"), environment_case_sensitive=False)
    assert relaxed.projects == ("sampleproject",)


# --- explanations ------------------------------------------------------------------------------------------------


def test_no_publisher_for_repository_says_what_was_compared() -> None:
    """With no publisher for the repository, the description names repository, issuer and the fields compared."""
    text = miss(Publishers([pub(repository="group/other")]), identity())
    assert "no publisher is registered for repository 'group/project' of issuer 'gitlab-com'" in text
    assert "compared issuer and repository" in text


@pytest.mark.parametrize(
    ("registered", "who", "fields", "differing"),
    [
        pytest.param(
            {},
            {"workflow": "release.yml"},
            "issuer, repository, workflow, environment",
            "workflow expected '.gitlab-ci.yml', token has 'release.yml'",
            id="workflow",
        ),
        pytest.param(
            {"environment": "release"},
            {},
            "issuer, repository, workflow, environment",
            "environment expected 'release', token has none",
            id="environment-missing",
        ),
        pytest.param(
            {"owner_id": "1"},
            {},
            "issuer, repository, workflow, environment, owner_id",
            "owner_id expected '1', token has '12885807'",
            id="owner-id",
        ),
    ],
)
def test_same_repository_miss_names_compared_and_differing_fields(
    registered: dict[str, Any], who: dict[str, Any], fields: str, differing: str
) -> None:
    """A miss among the repository's publishers lists the fields compared and the one that differed."""
    text = miss(Publishers([pub(**registered)]), identity(**who))
    assert "1 publisher is registered for repository 'group/project' of issuer 'gitlab-com'" in text
    assert f"(compared {fields})" in text
    assert text.endswith(f"nearest: {differing}")


def test_miss_explains_the_nearest_publisher() -> None:
    """Among several publishers of the repository, the description shows the one with the fewest differing fields."""
    far = pub(workflow="deploy.yml", environment="prod", owner_id="1")
    near = pub(environment="release")
    text = miss(Publishers([far, near]), identity(environment="staging"))
    assert "2 publishers are registered" in text
    assert text.endswith("nearest: environment expected 'release', token has 'staging'")


@pytest.mark.parametrize(
    ("own", "who"),
    [
        pytest.param((), identity(), id="no-candidates"),
        pytest.param((pub(projects=("visible",)),), identity(workflow="other.yml"), id="same-repo-miss"),
    ],
)
def test_miss_never_mentions_other_repositories(own: tuple[Publisher, ...], who: Identity) -> None:
    """An invalid-publisher description never names another repository's publisher or its projects."""
    # The secret publisher has the token's workflow, so it would be the "nearest" if it were ever looked at.
    secret = pub(repository="secret/repo", projects=("topsecret",), workflow=who.workflow)
    text = miss(Publishers([secret, *own]), who)
    assert "secret/repo" not in text
    assert "topsecret" not in text


# --- through the app ---------------------------------------------------------------------------------------------


async def test_miss_over_http_never_mentions_other_repositories(make_gateway: Any, issuer: TestIssuer) -> None:
    """Over HTTP, a miss for group/project says nothing about the publisher registered for secret/repo."""
    secret = PUBLISHER | {"repository": "secret/repo", "projects": ["topsecret"]}
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER, secret])
    for token in (issuer.gitlab_token(workflow="other.yml"), issuer.gitlab_token(project_path="group/unknown")):
        response = await gateway.mint(token)
        assert response.status_code == 422
        assert error_code(response) == "invalid-publisher"
        assert "secret/repo" not in response.text
        assert "topsecret" not in response.text


async def test_minted_projects_are_normalized_and_deduplicated(make_gateway: Any, issuer: TestIssuer) -> None:
    """The projects granted are PEP 503-normalized and each appears once, across names and publishers."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)},
        [
            PUBLISHER | {"projects": ["Sample_Project", "sample.project", "Zope.Interface"]},
            PUBLISHER | {"projects": ["SAMPLE-project", "other"]},
        ],
    )
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 200, response.text
    assert response.json()["projects"] == ["sample-project", "zope-interface", "other"]


async def test_invalid_publisher_response_describes_the_miss(gateway: Any, issuer: TestIssuer) -> None:
    """The HTTP error description for a miss is the matcher's explanation, naming the differing field."""
    response = await gateway.mint(issuer.gitlab_token(workflow="release.yml"))
    assert response.status_code == 422
    assert error_code(response) == "invalid-publisher"
    assert "workflow expected '.gitlab-ci.yml', token has 'release.yml'" in description(response)


@pytest.mark.parametrize(
    ("pattern", "ref", "matches"),
    [
        pytest.param("refs/tags/v*", "refs/tags/v1.2.3", True, id="star"),
        pytest.param("refs/tags/v*", "refs/tags/v1/x", False, id="star-stops-at-slash"),
        pytest.param("refs/tags/v*", "refs/tags/x1", False, id="literal-prefix"),
        pytest.param("refs/heads/**", "refs/heads/a/b/c", True, id="double-star"),
        pytest.param("refs/heads/main", "refs/heads/main", True, id="literal"),
        pytest.param("refs/heads/main", "refs/heads/mainline", False, id="whole-ref"),
        # Regex characters in a pattern are literal.
        pytest.param("refs/tags/v1.0", "refs/tags/v1x0", False, id="dot-literal"),
    ],
)
def test_refs_patterns(pattern: str, ref: str, matches: bool) -> None:
    """`*` matches within one path segment, `**` across segments, everything else literally and in full."""
    publishers = Publishers([pub(refs=(pattern,))])
    who = identity(ref_path=ref)
    if matches:
        assert publishers.match(who).projects == ("sampleproject",)
    else:
        assert "refs expected" in miss(publishers, who)


def test_refs_never_match_an_identity_without_a_full_ref() -> None:
    """A publisher with refs refuses an identity whose kind supplies no ref_path."""
    assert "token has none" in miss(Publishers([pub(refs=("refs/**",))]), identity())


def test_repository_id_mismatch_is_named() -> None:
    """A publisher's repository_id must equal the identity's; a mismatch names both values."""
    publishers = Publishers([pub(repository_id="61254376")])
    assert publishers.match(identity(repository_id="61254376")).projects == ("sampleproject",)
    assert "repository_id expected '61254376', token has '1'" in miss(publishers, identity(repository_id="1"))
