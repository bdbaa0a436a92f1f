"""`gateway check --replay AUDIT.jsonl`: what a config change would do to the identities that already came by.

Every audit line whose token was verified is re-decided against the config being checked, with the exchange's own
pure steps (`exchange.decide`: max_token_age, the kind's identity, issuer policy and deny lists, publisher
matching, the kind's last word), and compared with what the gateway decided when the line was written. Two kinds
of change matter before a reload: identities that would stop matching (a release pipeline about to break) and
identities that would newly be granted projects (a publisher broader than meant: the one an attacker needs).

A line is re-decided from the verified claims it carries (`claims`, `at`). Lines written before the audit line
carried them have only repository, workflow, ref, sha and environment: rules needing more are skipped for them,
and the report names those rules, so "nothing changes" is never claimed where it could not be checked.

Not re-decided at all: the signature, `exp` and the jti (facts of the moment, not policy), revocations and pins
on first use (the operator's state, not config), and lines refused before policy could speak (rate limits, an
unreachable issuer, a bug): their outcome says nothing about the config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import GatewayError, InvalidPayload
from .exchange import check_policy, decide
from .identity import FIELDS, Identity
from .issuers import KINDS, Issuer
from .publishers import Match, Publisher, Publishers

__all__ = ["Report", "read_audit", "replay"]

# Outcomes that were the policy's decision. A line's `projects` are what matching granted whenever matching was
# reached (the exchange records them at once), whatever refused the mint afterwards (a spent jti, a changed pin,
# the store). Other outcomes (rate-limited, issuer-unavailable, internal-error, invalid-payload) say nothing
# about the publishers.
_DECIDED = frozenset(
    {"success", "invalid-reuse-token", "replay-store-unavailable", "invalid-publisher", "invalid-token"}
)

# The prefix a text-format log puts before the audit line's JSON (logs.configure).
_TEXT_MARKER = " gateway.audit: "


@dataclass(frozen=True, slots=True)
class AuditLine:
    number: int
    fields: Mapping[str, Any]


@dataclass(slots=True)
class Change:
    """One identity (issuer, repository, workflow, environment, ref) and what replaying its lines found."""

    label: str
    lines: list[int] = field(default_factory=list)
    granted_before: set[str] = field(default_factory=set)
    granted_now: set[str] = field(default_factory=set)
    refusals: dict[str, None] = field(default_factory=dict)
    undecided: dict[str, None] = field(default_factory=dict)
    # Lines that were granted something and are now refused.
    stopped: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    changes: dict[str, Change] = field(default_factory=dict)
    replayed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    unreadable: list[int] = field(default_factory=list)

    @property
    def new_grants(self) -> dict[str, set[str]]:
        grants = {label: c.granted_now - c.granted_before for label, c in self.changes.items()}
        return {label: projects for label, projects in grants.items() if projects}

    def render(self) -> str:
        out = [f"replayed {self.replayed} audit line(s) ({len(self.changes)} identities)"]
        for reason, count in sorted(self.skipped.items()):
            out.append(f"  not re-decided: {count} line(s) {reason}")
        if self.unreadable:
            out.append(f"  ignored: {len(self.unreadable)} line(s) that are not JSON ({_lines(self.unreadable)})")
        stopped = [c for c in self.changes.values() if c.stopped]
        out.append(f"would stop matching: {len(stopped)}")
        for c in stopped:
            out.append(f"  {c.label} ({_lines(c.stopped)}): was granted {_projects(c.granted_before)}; now refused")
            out += [f"    {refusal}" for refusal in c.refusals]
        lost = [c for c in self.changes.values() if not c.stopped and c.granted_before - c.granted_now]
        if lost:
            out.append(f"would lose projects: {len(lost)}")
            for c in lost:
                out.append(f"  {c.label} ({_lines(c.lines)}): no longer {_projects(c.granted_before - c.granted_now)}")
        grants = self.new_grants
        out.append(f"would newly be granted projects: {len(grants)}")
        for label, projects in grants.items():
            c = self.changes[label]
            before = f"was granted {_projects(c.granted_before)}" if c.granted_before else "was refused"
            out.append(f"  {label} ({_lines(c.lines)}): {_projects(projects)} ({before})")
        partial = [c for c in self.changes.values() if c.undecided]
        if partial:
            out.append(f"could not be re-decided in full (lines written without claims): {len(partial)}")
            for c in partial:
                out.append(f"  {c.label} ({_lines(c.lines)}): rules not re-decided: {', '.join(c.undecided)}")
        return "\n".join(out) + "\n"


def read_audit(path: Path) -> Iterator[AuditLine | int]:
    """The mint audit lines of a log file (JSON lines, or the text format), or the number of a line that is
    neither; other log records are passed over."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            if not text.startswith("{") and _TEXT_MARKER in text:
                text = text.partition(_TEXT_MARKER)[2]
            try:
                fields = json.loads(text)
            except ValueError:
                yield number
                continue
            if isinstance(fields, dict) and fields.get("event") == "mint":
                yield AuditLine(number, fields)
            elif not isinstance(fields, dict):
                yield number


def replay(settings: Settings, lines: Iterable[AuditLine | int]) -> Report:
    report = Report()
    publishers = Publishers(settings.publishers)
    for line in lines:
        if isinstance(line, int):
            report.unreadable.append(line)
            continue
        _replay_line(settings, publishers, line, report)
    return report


def _replay_line(settings: Settings, publishers: Publishers, line: AuditLine, report: Report) -> None:
    fields = line.fields
    outcome = fields.get("outcome")
    claims = fields.get("claims")
    before = set(_strings(fields.get("projects")))
    if outcome not in _DECIDED or (outcome == "replay-store-unavailable" and not before):
        _skip(report, f"refused before policy decided ({outcome})")
        return
    if fields.get("revocation") is not None:
        # Revocations are the operator's state, not config: a config change neither makes nor lifts one.
        _skip(report, "refused by a revocation")
        return
    if not isinstance(claims, dict) and not isinstance(fields.get("repository"), str):
        _skip(report, "whose token was never verified")
        return
    undecided: list[str] = []
    try:
        if isinstance(claims, dict):
            _, match = _decide(settings, publishers, claims, fields.get("at"))
        else:
            _, match = _decide_old(settings, fields, undecided)
        now, refusal = set(match.projects), None
    except GatewayError as e:
        now, refusal = set(), f"{e.code}: {e.description}"
    except (KeyError, TypeError, ValueError) as e:
        # A line edited by hand or cut short: say so rather than guess.
        _skip(report, f"with malformed fields ({type(e).__name__})")
        return
    report.replayed += 1
    # Labelled as the line logged it, so one identity's lines group together whatever they are decided now.
    label = _label(_label_identity(fields))
    change = report.changes.setdefault(label, Change(label))
    change.lines.append(line.number)
    change.granted_before |= before
    change.granted_now |= now
    change.undecided |= dict.fromkeys(undecided)
    if refusal is not None:
        change.refusals[refusal] = None
        if before:
            change.stopped.append(line.number)


def _decide(
    settings: Settings, publishers: Publishers, claims: Mapping[str, Any], at: Any
) -> tuple[Identity, Match]:
    issuer = _trusted(settings.by_url.get(claims["iss"]), claims["iss"])
    return decide(publishers, issuer, claims, float(at))


def _trusted(issuer: Issuer | None, named: str) -> Issuer:
    if issuer is None:
        raise InvalidPayload(f"issuer {named!r} is not trusted by this config")
    if not issuer.enabled:
        raise InvalidPayload(f"issuer {issuer.name!r} is suspended by this config")
    return issuer


def _decide_old(settings: Settings, fields: Mapping[str, Any], undecided: list[str]) -> tuple[Identity, Match]:
    """A line without claims: the identity it logged, and only the rules that identity can decide."""
    issuer = _trusted(settings.issuers.get(fields["issuer"]), fields["issuer"])
    identity = _old_identity(issuer, fields)
    # Rules whose input an old line lacks are switched off for it, and named in the report.
    off: dict[str, Any] = {}
    if issuer.max_token_age is not None:
        off["max_token_age"] = None
    if issuer.deny:
        off["deny"] = ()
    if issuer.require_protected_ref and identity.protected_ref is None:
        off["require_protected_ref"] = False
    if issuer.runner_environments is not None and identity.runner_environment is None:
        off["runner_environments"] = None
    undecided += off
    lenient = dataclasses.replace(issuer, **off)
    check_policy(lenient, {}, identity)
    kind = KINDS[issuer.kind]
    # Pins and refs the identity cannot speak to are left out of the comparison, and named.
    own = Publishers(p for p in settings.publishers if p.issuer == issuer.name).candidates(identity)
    candidates = Publishers([_strip(p, identity, undecided) for p in own])
    match = candidates.match(identity, environment_case_sensitive=kind.environment_case_sensitive)
    if kind.check_match is not None:
        try:
            kind.check_match(issuer, {}, match)
        except GatewayError:
            undecided.append(f"the {kind.name} kind's rules on {', '.join(sorted(kind.match_claims))}")
    return identity, match


def _strip(publisher: Publisher, identity: Identity, undecided: list[str]) -> Publisher:
    unknown: dict[str, Any] = {
        name: None
        for name, identity_name in (("repository_id", "repository_id"), ("owner_id", "owner_id"), ("refs", "ref_path"))
        if getattr(publisher, name) is not None and getattr(identity, identity_name) is None
    }
    for name in unknown:
        if name not in undecided:
            undecided.append(name)
    return dataclasses.replace(publisher, **unknown) if unknown else publisher


def _old_identity(issuer: Issuer, fields: Mapping[str, Any]) -> Identity:
    logged = _logged(fields)
    values: dict[str, Any] = {name: logged.get(name) for name in FIELDS if name not in ("issuer", "issuer_url", "kind")}
    if not isinstance(values["repository"], str):
        raise ValueError("no repository")
    return Identity(issuer=issuer.name, issuer_url=issuer.url, kind=issuer.kind, **values)


def _label_identity(fields: Mapping[str, Any]) -> Identity:
    """For the report only: who a refused line was about, from the identity it logged or its claims."""
    logged = _logged(fields)
    claims: Mapping[str, Any] = fields["claims"] if isinstance(fields.get("claims"), dict) else {}
    repository = logged.get("repository") or claims.get("project_path") or claims.get("repository") or "?"
    return Identity(
        issuer=str(fields.get("issuer") or "?"),
        issuer_url="",
        kind="",
        repository=str(repository),
        workflow=_str(logged.get("workflow")),
        environment=_str(logged.get("environment") or claims.get("environment")),
        ref=_str(logged.get("ref") or claims.get("ref")),
    )


def _logged(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    """The identity as the line logged it: the whole `identity`, or the few fields older lines have."""
    identity = fields.get("identity")
    return identity if isinstance(identity, dict) else fields


def _label(identity: Identity) -> str:
    parts = [identity.issuer, identity.repository, f"workflow {_show(identity.workflow)}"]
    parts.append(f"environment {_show(identity.environment)}")
    parts.append(f"ref {_show(identity.ref)}")
    return " ".join(parts)


def _skip(report: Report, reason: str) -> None:
    report.skipped[reason] = report.skipped.get(reason, 0) + 1


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _show(value: str | None) -> str:
    return "(none)" if value is None else repr(value)


def _projects(projects: Iterable[str]) -> str:
    return ", ".join(sorted(projects)) or "nothing"


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"
