from __future__ import annotations

from typing import Any, NamedTuple


class Identity(NamedTuple):
    """The one shape every issuer kind's claims become; publishers are matched against this only.

    Immutable, as a frozen dataclass would be, and built once per mint: a named tuple of its 19 fields is built
    in less than half a frozen dataclass's time (which sets each field through object.__setattr__).
    """

    issuer: str
    issuer_url: str
    kind: str
    repository: str
    repository_id: str | None = None
    owner: str | None = None
    owner_id: str | None = None
    workflow: str | None = None
    ref: str | None = None
    # The full ref (`refs/heads/main`, `refs/tags/v1`), which publisher `refs` patterns match; `ref` is its
    # short name for branches and tags.
    ref_path: str | None = None
    ref_type: str | None = None
    sha: str | None = None
    environment: str | None = None
    trigger: str | None = None
    run_id: str | None = None
    actor: str | None = None
    runner_environment: str | None = None
    visibility: str | None = None
    protected_ref: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        # Every field is a str, bool or None, so no deep copy is needed.
        return dict(zip(FIELDS, self))  # noqa: B905 -- a named tuple has exactly FIELDS


FIELDS = Identity._fields
