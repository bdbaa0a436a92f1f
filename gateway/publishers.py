"""Publishers, their index by (issuer, repository), and matching an identity against them.

Only publishers of the token's own issuer and repository are ever looked at: a lookup is one dict access, and an
`invalid-publisher` explanation can only talk about the repository the token itself names.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .errors import InvalidPublisher
from .identity import Identity


@dataclass(frozen=True, slots=True)
class Publisher:
    issuer: str
    repository: str
    workflow: str
    projects: tuple[str, ...]
    environment: str | None = None
    owner_id: str | None = None
    # Pins against resurrection: a project deleted and re-created under the same path gets a new id.
    repository_id: str | None = None
    # Patterns the job's full ref must match (one of them), or None for any ref.
    refs: tuple[str, ...] | None = None


class Comparison(NamedTuple):
    field: str
    expected: str | None
    got: str | None
    ok: bool

    def __str__(self) -> str:
        if self.ok:
            return f"{self.field} matches"
        return f"{self.field} expected {_show(self.expected)}, token has {_show(self.got)}"


class Match(NamedTuple):
    publishers: tuple[Publisher, ...]
    projects: tuple[str, ...]


def normalize_project(name: str) -> str:
    # PEP 503: the index treats these names as one project, so must we.
    return re.sub(r"[-_.]+", "-", name).lower()


def fold(path: str) -> str | None:
    """Case-fold a repository path for comparison, or None if it can never match.

    Only ASCII is folded: `str.lower()` maps e.g. KELVIN SIGN to "k", which would let a look-alike path match a
    registered one. GitLab and GitHub paths are ASCII, so a non-ASCII path is foreign by construction.
    """
    return path.lower() if path.isascii() else None


def same_folded(a: str, b: str) -> bool:
    """`fold(a) == fold(b)`, without folding when the two are the very same string (a job's paths usually are)."""
    return a == b or fold(a) == fold(b)


def under_namespaces(repository: str, namespaces: Iterable[str]) -> bool:
    folded = fold(repository)
    if folded is None:
        return False
    # The trailing "/" keeps `atlas` from admitting `atlas-evil/x`.
    return any(folded.startswith(namespace.lower() + "/") for namespace in namespaces)


def compare(
    publisher: Publisher, identity: Identity, *, environment_case_sensitive: bool = True
) -> tuple[Comparison, ...]:
    """Every field the publisher constrains, compared with the identity; repository was matched by the index."""
    env_got = identity.environment
    if publisher.environment is None:
        env_ok = True
    elif env_got is None:
        env_ok = False
    elif environment_case_sensitive:
        env_ok = env_got == publisher.environment
    else:
        # ASCII folding only, as for repositories: KELVIN SIGN must not pass for "k".
        env_ok = fold(env_got) is not None and fold(env_got) == fold(publisher.environment)
    comparisons = [
        Comparison("workflow", publisher.workflow, identity.workflow, identity.workflow == publisher.workflow),
        Comparison("environment", publisher.environment or "(any)", env_got, env_ok),
    ]
    if publisher.repository_id is not None:
        comparisons.append(
            Comparison(
                "repository_id",
                publisher.repository_id,
                identity.repository_id,
                identity.repository_id == publisher.repository_id,
            )
        )
    if publisher.owner_id is not None:
        comparisons.append(
            Comparison("owner_id", publisher.owner_id, identity.owner_id, identity.owner_id == publisher.owner_id)
        )
    if publisher.refs is not None:
        comparisons.append(
            Comparison(
                "refs",
                " or ".join(publisher.refs),
                identity.ref_path,
                identity.ref_path is not None
                and any(ref_pattern(pattern).fullmatch(identity.ref_path) for pattern in publisher.refs),
            )
        )
    return tuple(comparisons)


def ref_pattern_problem(pattern: str) -> str | None:
    """What is wrong with a publisher's `refs` pattern, or None."""
    if not pattern.startswith("refs/"):
        return f"{pattern!r} must be a full ref pattern like 'refs/tags/v*' or 'refs/heads/main'"
    if any(c.isspace() for c in pattern) or not pattern.isascii():
        return f"{pattern!r} must be ASCII without whitespace"
    if "//" in pattern or pattern.endswith("/"):
        return f"{pattern!r} has an empty path segment"
    return None


@functools.lru_cache(maxsize=4096)
def ref_pattern(pattern: str) -> re.Pattern[str]:
    """`**` matches across path segments, `*` within one; everything else is literal (no `?`, no classes)."""
    parts = []
    for i, chunk in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append("[^/]*".join(re.escape(piece) for piece in chunk.split("*")))
    return re.compile("".join(parts), re.DOTALL)


class Publishers:
    def __init__(self, publishers: Iterable[Publisher]) -> None:
        index: defaultdict[tuple[str, str], list[Publisher]] = defaultdict(list)
        for publisher in publishers:
            folded = fold(publisher.repository)
            if folded is not None:
                index[(publisher.issuer, folded)].append(publisher)
        self._index = {key: tuple(value) for key, value in index.items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def candidates(self, identity: Identity) -> tuple[Publisher, ...]:
        folded = fold(identity.repository)
        if folded is None:
            return ()
        return self._index.get((identity.issuer, folded), ())

    def match(self, identity: Identity, *, environment_case_sensitive: bool = True) -> Match:
        candidates = self.candidates(identity)
        if not candidates:
            raise InvalidPublisher(
                f"no publisher is registered for repository {identity.repository!r} of issuer "
                f"{identity.issuer!r} (compared issuer and repository; repository is case-insensitive ASCII)"
            )
        results = [
            (publisher, compare(publisher, identity, environment_case_sensitive=environment_case_sensitive))
            for publisher in candidates
        ]
        matched = [publisher for publisher, comparisons in results if all(c.ok for c in comparisons)]
        if not matched:
            raise InvalidPublisher(_explain_miss(identity, results))
        # A publisher bound to an environment is the more specific grant; when one matches, the unbound ones for
        # the same repository do not widen the token's projects.
        bound = [p for p in matched if p.environment is not None]
        chosen = tuple(bound or matched)
        projects = tuple(dict.fromkeys(project for publisher in chosen for project in publisher.projects))
        return Match(publishers=chosen, projects=projects)


def _explain_miss(identity: Identity, results: Sequence[tuple[Publisher, tuple[Comparison, ...]]]) -> str:
    fields = ", ".join(["issuer", "repository", *dict.fromkeys(c.field for _, cs in results for c in cs)])
    nearest = min(results, key=lambda result: sum(not c.ok for c in result[1]))
    differing = "; ".join(str(c) for c in nearest[1] if not c.ok)
    count = len(results)
    plural = "publisher is" if count == 1 else "publishers are"
    return (
        f"{count} {plural} registered for repository {identity.repository!r} of issuer {identity.issuer!r} "
        f"but none matches (compared {fields}); nearest: {differing}"
    )


def _show(value: str | None) -> str:
    return "none" if value is None else repr(value)
