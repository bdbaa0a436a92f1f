from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    """The one shape every issuer kind's claims become; publishers are matched against this only."""

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
        # Every field is a str, bool or None, so no deep copy is needed (dataclasses.asdict would cost 20x).
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(field.name for field in fields(Identity))
