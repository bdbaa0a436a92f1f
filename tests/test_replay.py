"""`gateway check --replay`: an audit log recorded by a real gateway, re-decided against changed configs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.__main__ import main
from gateway.logs import JSONFormatter
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config

OTHER = PUBLISHER | {"repository": "group/other", "projects": ["otherproject"]}


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    """The gateway's audit lines, written by its own JSON formatter to a file, as `log_format = "json"` does."""
    path = tmp_path / "audit.jsonl"
    handler = logging.FileHandler(path)
    handler.setFormatter(JSONFormatter())
    audit = logging.getLogger("gateway.audit")
    level = audit.level
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        yield path
    finally:
        audit.removeHandler(handler)
        audit.setLevel(level)
        handler.close()


@pytest.fixture
async def recorded(make_gateway: Any, issuer: TestIssuer, audit_file: Path, clock: FakeClock) -> Path:
    """A log of three attempts: group/project minted from main, group/other refused (no publisher), and
    group/project refused for a token signed with a foreign signature (never verified)."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    now = int(clock())
    assert (await gateway.mint(issuer.gitlab_token(now=now - 100))).status_code == 200
    other = await gateway.mint(issuer.gitlab_token(project_path="group/other", now=now))
    assert other.status_code == 422
    forged = issuer.gitlab_token()
    forged = forged.rpartition(".")[0] + "." + issuer.gitlab_token().rpartition(".")[2]
    assert (await gateway.mint(forged)).status_code == 422
    return audit_file


def run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    issuer: TestIssuer,
    log: Path,
    publishers: list[dict[str, Any]],
    *extra: str,
    **issuer_keys: Any,
) -> tuple[int, str]:
    """`gateway check --replay LOG` on a candidate config with these publishers: exit status and output."""
    directory = tmp_path / f"candidate-{len(list(tmp_path.glob('candidate-*')))}"
    directory.mkdir()
    path = write_config(directory, {"gitlab-com": gitlab_issuer(issuer, **issuer_keys)}, publishers)
    code = main(["check", "--config", str(path), "--replay", str(log), *extra])
    return code, capsys.readouterr().out


async def test_unchanged_config_changes_nothing(
    tmp_path: Path, issuer: TestIssuer, recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying a log against the config that wrote it finds nothing to stop and nothing new, and exits 0."""
    code, out = run(capsys, tmp_path, issuer, recorded, [PUBLISHER])
    assert code == 0, out
    assert "replayed 2 audit line(s) (2 identities)" in out
    assert "not re-decided: 1 line(s) whose token was never verified" in out
    assert "would stop matching: 0\n" in out
    assert "would newly be granted projects: 0\n" in out


async def test_dropped_publisher_is_listed_as_stopping(
    tmp_path: Path, issuer: TestIssuer, recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config without the publisher that granted a logged mint lists that identity as stopping, exit 0."""
    code, out = run(capsys, tmp_path, issuer, recorded, [PUBLISHER | {"repository": "group/renamed"}])
    assert code == 0, out
    assert (
        "would stop matching: 1\n  gitlab-com group/project workflow '.gitlab-ci.yml' environment (none) ref 'main'"
        in out
    )
    assert "was granted sampleproject; now refused" in out
    assert "invalid-publisher: no publisher is registered for repository 'group/project'" in out


async def test_broad_publisher_is_a_new_grant_exit_3(
    tmp_path: Path, issuer: TestIssuer, recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that grants a logged, refused identity lists it with its projects and exits 3; --allow-grants 0."""
    code, out = run(capsys, tmp_path, issuer, recorded, [PUBLISHER, OTHER])
    assert code == 3, out
    assert "would newly be granted projects: 1\n  gitlab-com group/other " in out
    assert ": otherproject (was refused)" in out
    code, out = run(capsys, tmp_path, issuer, recorded, [PUBLISHER, OTHER], "--allow-grants")
    assert code == 0
    assert ": otherproject (was refused)" in out


async def test_extra_project_is_a_new_grant(
    tmp_path: Path, issuer: TestIssuer, recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A publisher granting one more project to an identity already granted lists just the new project."""
    code, out = run(capsys, tmp_path, issuer, recorded, [PUBLISHER | {"projects": ["sampleproject", "extra"]}])
    assert code == 3
    assert ": extra (was granted sampleproject)" in out


@pytest.mark.parametrize(
    ("issuer_keys", "publisher", "reason"),
    [
        pytest.param({"deny": {"pipeline_source": ["push"]}}, PUBLISHER, "claim 'pipeline_source'", id="deny"),
        pytest.param({"max_token_age": 60}, PUBLISHER, "at most 60 s old", id="max-token-age"),
        pytest.param({}, PUBLISHER | {"refs": ["refs/tags/*"]}, "refs expected", id="refs"),
        pytest.param({}, PUBLISHER | {"repository_id": "1"}, "repository_id expected '1'", id="repository-id"),
        pytest.param({"runner_environments": ["self-hosted"]}, PUBLISHER, "from self-hosted runners", id="runners"),
    ],
)
async def test_new_rules_are_re_decided_from_logged_claims(
    tmp_path: Path,
    issuer: TestIssuer,
    recorded: Path,
    capsys: pytest.CaptureFixture[str],
    issuer_keys: dict[str, Any],
    publisher: dict[str, Any],
    reason: str,
) -> None:
    """Rules on raw claims, token age, refs and ids are re-decided from the claims each line carries."""
    code, out = run(capsys, tmp_path, issuer, recorded, [publisher], **issuer_keys)
    assert code == 0, out
    assert "would stop matching: 1\n  gitlab-com group/project " in out
    assert reason in out
    assert "could not be re-decided" not in out


def old_line(**fields: Any) -> str:
    """An audit line as gateways wrote them before lines carried claims."""
    line = {
        "time": "2026-01-05T10:00:00.000Z",
        "level": "info",
        "logger": "gateway.audit",
        "event": "mint",
        "outcome": "success",
        "client": "10.0.0.7",
        "issuer": "gitlab-com",
        "repository": "group/project",
        "workflow": ".gitlab-ci.yml",
        "ref": "main",
        "sha": "a3f1c9e07b52d48e6f0c2b9d17e4a85c3b6d0f92",
        "environment": None,
        "publisher": [{"repository": "group/project", "workflow": ".gitlab-ci.yml", "environment": None}],
        "projects": ["sampleproject"],
        "jti_hash": "gateway:jti:abc",
    }
    return json.dumps(line | fields)


def test_older_lines_say_which_rules_could_not_be_re_decided(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line without claims is re-decided on what it logged, and the rules it cannot speak to are named."""
    log = tmp_path / "old.jsonl"
    log.write_text(old_line() + "\n")
    pinned = PUBLISHER | {"repository_id": "61254376", "refs": ["refs/heads/main"]}
    code, out = run(capsys, tmp_path, issuer, log, [pinned], max_token_age=60, deny={"pipeline_source": ["push"]})
    assert code == 0, out
    assert "would stop matching: 0" in out
    assert "rules not re-decided: max_token_age, deny, repository_id, refs" in out


def test_older_lines_still_decide_what_they_logged(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line without claims still stops matching when the fields it logged no longer match (the workflow)."""
    log = tmp_path / "old.jsonl"
    log.write_text(old_line() + "\n")
    code, out = run(capsys, tmp_path, issuer, log, [PUBLISHER | {"workflow": "release.yml"}])
    assert code == 0
    assert "would stop matching: 1" in out
    assert "workflow expected 'release.yml', token has '.gitlab-ci.yml'" in out


def test_text_format_lines_and_other_records_are_read(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Audit lines in the text log format are read; other log records and non-JSON lines are passed over."""
    log = tmp_path / "gateway.log"
    text_line = "2026-01-05 10:00:00,000 INFO gateway.audit: " + old_line(
        repository="group/other", outcome="invalid-publisher", projects=[]
    )
    log.write_text(
        "2026-01-05 10:00:00,000 INFO gateway.app: started\n"
        + text_line
        + "\n"
        + json.dumps({"level": "info", "logger": "gateway.reload", "message": "reloaded"})
        + "\nnot json at all\n"
    )
    code, out = run(capsys, tmp_path, issuer, log, [PUBLISHER, OTHER])
    assert code == 3, out
    assert "replayed 1 audit line(s)" in out
    assert (
        "gitlab-com group/other workflow '.gitlab-ci.yml' environment (none) ref 'main' (line 2): otherproject" in out
    )
    assert "ignored: 2 line(s) that are not JSON (lines 1, 4)" in out


def test_rate_limited_lines_are_not_re_decided(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line refused before the policy decided (rate-limited) is counted apart, never read as a refusal."""
    log = tmp_path / "old.jsonl"
    log.write_text(old_line(outcome="rate-limited", projects=[]) + "\n")
    code, out = run(capsys, tmp_path, issuer, log, [PUBLISHER])
    assert code == 0
    assert "not re-decided: 1 line(s) refused before policy decided (rate-limited)" in out
    assert "would newly be granted projects: 0" in out


def test_invalid_config_exits_1_and_unreadable_log_2(tmp_path: Path, issuer: TestIssuer) -> None:
    """An invalid config exits 1 before replaying; an audit log that cannot be read exits 2 (real CLI process)."""
    log = tmp_path / "audit.jsonl"
    log.write_text(old_line() + "\n")
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER | {"refs": []}])
    invalid = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path), "--replay", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert invalid.returncode == 1
    assert "publishers.toml: [[publisher]] #1 refs: must name at least one ref pattern" in invalid.stderr
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER])
    missing = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path), "--replay", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "cannot be read" in missing.stderr


def test_revoked_and_pin_refused_lines_are_not_new_grants(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mint refused by a revocation is not re-decided, and one refused by a changed pin after matching keeps the
    projects matching granted: neither is reported as a new grant of the config."""
    log = tmp_path / "old.jsonl"
    revoked = old_line(outcome="invalid-publisher", projects=[], publisher=[], revocation="r-1")
    pin_changed = old_line(outcome="invalid-publisher", pin="changed")
    log.write_text(revoked + "\n" + pin_changed + "\n")
    code, out = run(capsys, tmp_path, issuer, log, [PUBLISHER])
    assert code == 0, out
    assert "not re-decided: 1 line(s) refused by a revocation" in out
    assert "replayed 1 audit line(s)" in out
    assert "would newly be granted projects: 0" in out

