"""Logging: the process's format and level, and the audit line written for every mint attempt."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from .exchange import Attempt

audit_log = logging.getLogger("gateway.audit")


def audit(attempt: Attempt, outcome: str) -> None:
    """One structured line per mint attempt; it never holds the token, only the jti's hash."""
    identity = attempt.identity
    fields: dict[str, Any] = {
        "event": "mint",
        "outcome": outcome,
        "client": attempt.client,
        "issuer": attempt.issuer,
        "repository": identity.repository if identity else None,
        "workflow": identity.workflow if identity else None,
        "ref": identity.ref if identity else None,
        "sha": identity.sha if identity else None,
        "environment": identity.environment if identity else None,
        "publisher": [
            {"repository": p.repository, "workflow": p.workflow, "environment": p.environment}
            for p in attempt.publishers
        ],
        "projects": list(attempt.projects),
        "jti_hash": attempt.jti,
        # For `gateway check --replay` (replay.py): when it was judged, the whole identity, and the verified
        # claims every rule reads (max_token_age's iat, deny lists, the kind's own), present only once the
        # signature held.
        "at": attempt.at,
        "identity": identity.as_dict() if identity else None,
        "claims": audit_claims(attempt.claims) if attempt.claims is not None else None,
    }
    # Only when they happened, so the common line stays as it was.
    if attempt.revocation is not None:
        fields["revocation"] = attempt.revocation
    if attempt.pin is not None:
        fields["pin"] = attempt.pin
    if audit_log.isEnabledFor(logging.INFO):
        audit_log.info(json.dumps(fields, separators=(",", ":")), extra={"audit": fields})


# Never written to the audit log: the jti (only its hash, so a log line cannot be turned back into a spend key
# check), and claims that are a person's contact data rather than facts about the job.
UNLOGGED_CLAIMS = frozenset({"jti", "user_email", "user_identities"})


def audit_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in claims.items() if name not in UNLOGGED_CLAIMS}


class JSONFormatter(logging.Formatter):
    """One JSON object per line; audit records put their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


# Characters that would let a value forge or hide log lines: C0 and C1 controls (newlines, escape sequences),
# Unicode line and paragraph separators, bidirectional overrides, and lone surrogates (which no encoder takes).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """One line per record: whatever a message interpolates (a claim value, a description) has its control
    characters escaped, as `!r` would, so a token's contents can never start a line of their own in the log."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _UNSAFE.sub(_escape, record.message)
        return super().formatMessage(record)


def configure(level: str, format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
