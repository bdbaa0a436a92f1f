"""Logging: the process's format and level, and the audit line written for every mint attempt."""

from __future__ import annotations

import json
import logging
import sys
import time
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
    }
    if audit_log.isEnabledFor(logging.INFO):
        audit_log.info(json.dumps(fields, separators=(",", ":")), extra={"audit": fields})


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


def configure(level: str, format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
