"""The generic kind: an operator maps any OIDC CI provider's claims onto the Identity in issuers.toml.

    [issuers.buildkite]
    url = "https://agent.buildkite.com"
    kind = "generic"
    ignored_claims = ["job_id", "agent_id"]          # known and deliberately unused (for `explain` and tests)
    [issuers.buildkite.claims]                       # identity field = claim name, or template over claims
    repository = "{organization_slug}/{pipeline_slug}"
    workflow = "step_key"
    [issuers.buildkite.conditions]                   # claim = required value; the token is refused unless equal
    build_source = "webhook"

Syntax of a mapping value: with no `{` or `}` it names one claim, taken whole. With braces it is a template:
literal text and `{claim}` placeholders, a claim name being any characters but braces and whitespace (so
`{oidc.circleci.com/project-id}` is one claim). Nothing else is interpreted: no escapes, format specs, attribute
or index access. That is on purpose: `str.format` would let a template reach `{claim.__class__}`, and a claim
value is never parsed as a template. A placeholder's value must be a non-empty string or an integer (rendered in
decimal); `protected_ref` names one claim holding true/false or "true"/"false". A mapped claim the token lacks
refuses the token (invalid-token), as does a null, empty or non-scalar value: a guessed identity is worse than
none. Mapping and condition checks happen after the signature and registered claims were verified.

Templates are concatenation, so `{a}{b}` cannot tell "ab"+"c" from "a"+"bc": separate placeholders with a
character the claims cannot contain (Buildkite slugs, for instance, never contain `/`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidPublisher, InvalidToken
from ..identity import FIELDS, Identity
from ..tables import Table
from .base import Issuer, Kind

# Set by the gateway from the issuer's config, never from claims.
_GATEWAY_FIELDS = ("issuer", "issuer_url", "kind")
MAPPABLE = tuple(name for name in FIELDS if name not in _GATEWAY_FIELDS)
REQUIRED = ("repository", "workflow")
# The registered JWT claims, checked by the verifier for every kind.
REGISTERED = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CLAIM = re.compile(r"[^{}\s]+")
# JSON's exact integers; larger ones are not identifiers any CI sends (and str() of a huge int is slow).
_MAX_INT = 2**53


@dataclass(frozen=True, slots=True)
class Part:
    claim: bool  # True: `text` is a claim name to substitute; False: literal text
    text: str


@dataclass(frozen=True, slots=True)
class FieldMapping:
    field: str
    parts: tuple[Part, ...]

    @property
    def claims(self) -> tuple[str, ...]:
        return tuple(part.text for part in self.parts if part.claim)


@dataclass(frozen=True, slots=True)
class Options:
    mappings: tuple[FieldMapping, ...]
    conditions: tuple[tuple[str, str | bool | int], ...]
    ignored: frozenset[str]

    @property
    def known(self) -> frozenset[str]:
        used = {name for mapping in self.mappings for name in mapping.claims} | {n for n, _ in self.conditions}
        return REGISTERED | used | self.ignored


def parse(source: str) -> tuple[Part, ...]:
    """A mapping value as parts, or ValueError saying what is wrong with it."""
    if not source:
        raise ValueError("must not be empty")
    if "{" not in source and "}" not in source:
        if not _CLAIM.fullmatch(source):
            raise ValueError(f"{source!r} is not a claim name (claim names have no whitespace)")
        return (Part(claim=True, text=source),)
    parts: list[Part] = []
    position = 0
    for match in _PLACEHOLDER.finditer(source):
        _literal(parts, source[position : match.start()])
        name = match.group(1)
        if not name:
            raise ValueError(f"template {source!r} has an empty placeholder {{}}")
        if not _CLAIM.fullmatch(name):
            raise ValueError(f"template {source!r}: placeholder {{{name}}} is not a claim name (no whitespace)")
        parts.append(Part(claim=True, text=name))
        position = match.end()
    _literal(parts, source[position:])
    return tuple(parts)


def _literal(parts: list[Part], text: str) -> None:
    if "{" in text or "}" in text:
        raise ValueError("has an unmatched '{' or '}' (templates are text and {claim} placeholders, no nesting)")
    if text:
        parts.append(Part(claim=False, text=text))


def options(t: Table) -> Options | None:
    """Read `claims`, `conditions` and `ignored_claims` of a generic issuer, reporting problems through `t`."""
    if "claims" not in t.data:
        t.problem("claims", "is required")
    c = t.table("claims")
    k = t.table("conditions")
    ignored = t.strings("ignored_claims") or ()
    if c is None:
        return None
    claims_table = c.data
    k = k if k is not None else Table({}, t.file, f"{t.where[:-1]}.conditions]", t.problems)
    conditions_table = k.data

    mappings = []
    for field, source in claims_table.items():
        if field in _GATEWAY_FIELDS:
            c.problem(field, "is set by the gateway from the issuer's config and cannot be mapped from claims")
            continue
        if field not in MAPPABLE:
            c.problem(field, f"is not an identity field; map any of {', '.join(MAPPABLE)}")
            continue
        if not isinstance(source, str):
            c.problem(field, f"must be a claim name or a template string (got {type(source).__name__})")
            continue
        try:
            parts = parse(source)
        except ValueError as e:
            c.problem(field, str(e))
            continue
        if field == "protected_ref" and (len(parts) != 1 or not parts[0].claim):
            c.problem(field, 'must name one claim holding true/false or "true"/"false", not a template')
            continue
        mappings.append(FieldMapping(field=field, parts=parts))
    for field in REQUIRED:
        if field not in claims_table:
            c.problem(field, "is required: every generic issuer maps repository and workflow (publishers match them)")

    conditions: list[tuple[str, str | bool | int]] = []
    for name, value in conditions_table.items():
        if not _CLAIM.fullmatch(name):
            k.problem(repr(name), "is not a claim name (claim names have no whitespace or braces)")
        elif not isinstance(value, str | bool | int):
            k.problem(name, f"must be a string, true/false or an integer (got {type(value).__name__})")
        else:
            conditions.append((name, value))

    used = {name for mapping in mappings for name in mapping.claims} | {name for name, _ in conditions}
    for name in ignored:
        if name in used:
            t.problem("ignored_claims", f"{name!r} is used by the claims or conditions table, so it is not ignored")
    return Options(mappings=tuple(mappings), conditions=tuple(conditions), ignored=frozenset(ignored))


def _options(issuer: Issuer) -> Options:
    if not isinstance(issuer.options, Options):
        # config.load always sets them for a generic issuer; anything else is a programming error.
        raise TypeError(f"issuer {issuer.name!r} has no generic claim mapping")
    return issuer.options


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 200 else text[:200] + "..."


def _a(value: object) -> str:
    """The JSON type of a claim value, with its article, for messages."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _claim(issuer: Issuer, field: str, name: str, claims: Mapping[str, Any]) -> Any:
    where = f"issuer {issuer.name!r} maps it to {field}"
    if name not in claims:
        raise InvalidToken(f"token has no claim {name!r}, and {where}")
    value = claims[name]
    if value is None:
        raise InvalidToken(f"claim {name!r} is null, and {where}")
    return value


def _text(issuer: Issuer, field: str, name: str, claims: Mapping[str, Any]) -> str:
    value = _claim(issuer, field, name, claims)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < _MAX_INT:
        return str(value)
    what = "an empty string" if value == "" else _a(value)
    raise InvalidToken(
        f"claim {name!r} is {what}, and issuer {issuer.name!r} maps it to {field}, which takes a non-empty string "
        "or an integer"
    )


def _protected(issuer: Issuer, name: str, claims: Mapping[str, Any]) -> bool:
    value = _claim(issuer, "protected_ref", name, claims)
    if value is True or value == "true":
        return True
    if value is False or value == "false":
        return False
    raise InvalidToken(
        f"claim {name!r} is {_show(value)}; issuer {issuer.name!r} maps it to protected_ref, which takes true, false, "
        '"true" or "false"'
    )


def render(issuer: Issuer, mapping: FieldMapping, claims: Mapping[str, Any]) -> str | bool:
    """One identity field from the claims, as the issuer's mapping says."""
    if mapping.field == "protected_ref":
        return _protected(issuer, mapping.parts[0].text, claims)
    return "".join(
        _text(issuer, mapping.field, part.text, claims) if part.claim else part.text for part in mapping.parts
    )


def check_conditions(
    issuer: Issuer, conditions: tuple[tuple[str, str | bool | int], ...], claims: Mapping[str, Any]
) -> None:
    """Every condition must hold, by JSON type and value; the first that does not refuses the token."""
    for name, expected in conditions:
        rule = f"issuer {issuer.name!r} only accepts tokens whose claim {name!r} is {_show(expected)}"
        if name not in claims:
            raise InvalidPublisher(f"{rule}; this token has no {name!r} claim")
        actual = claims[name]
        # Types too: `true` is not "true", and 1 is not true (Python's 1 == True must not pass).
        if type(actual) is not type(expected) or actual != expected:
            raise InvalidPublisher(f"{rule}; this token has {_show(actual)}")


def identity(issuer: Issuer, claims: Mapping[str, Any]) -> Identity:
    options = _options(issuer)
    values: dict[str, Any] = {mapping.field: render(issuer, mapping, claims) for mapping in options.mappings}
    check_conditions(issuer, options.conditions, claims)
    return Identity(issuer=issuer.name, issuer_url=issuer.url, kind="generic", **values)


GENERIC = Kind(
    name="generic",
    identity=identity,
    # An operator compares what the provider sends; nothing says it folds case.
    environment_case_sensitive=True,
    known_claims=lambda issuer: _options(issuer).known,
    options=options,
)
