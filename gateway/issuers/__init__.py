"""Issuer kinds: each turns one CI platform's claims into the common Identity."""

from __future__ import annotations

from .base import DenyValue, Issuer, Kind
from .generic import GENERIC
from .github import GITHUB
from .gitlab import GITLAB

KINDS: dict[str, Kind] = {kind.name: kind for kind in (GITLAB, GITHUB, GENERIC)}

__all__ = ["KINDS", "DenyValue", "Issuer", "Kind"]
