"""Issuers the gateway cannot reach: `gateway probe-issuer --write-jwks` and `[issuers.X] jwks_file`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.testing import TestIssuer, oct_jwk, weak_rsa_jwk

# --- probe-issuer --write-jwks ----------------------------------------------------------------------------------


def test_write_jwks_snapshots_the_usable_keys(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--write-jwks writes exactly the published keys that pass the key rules, as published, and says which."""
    issuer.extra_jwks = [weak_rsa_jwk(1024, kid="weak"), oct_jwk(kid="shared-secret")]
    target = tmp_path / "keys" / "gitlab.jwks.json"
    target.parent.mkdir()
    code = main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)])
    out = capsys.readouterr().out
    # The weak and symmetric keys fail the "every published key is usable" rule; the usable one is still written.
    assert code == 1, out
    written = json.loads(target.read_text())
    assert [key["kid"] for key in written["keys"]] == [issuer.signing_kid]
    assert written["keys"][0] == issuer.jwks()["keys"][0]
    assert f"wrote 1 key(s) ('{issuer.signing_kid}') to {target}" in out
    # Written through a temporary file that was renamed into place: nothing else is left in the directory.
    assert [p.name for p in target.parent.iterdir()] == ["gitlab.jwks.json"]


def test_write_jwks_replaces_an_existing_file(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing snapshot is replaced whole by the new one (the gateway watching it reloads the new keys)."""
    target = tmp_path / "jwks.json"
    target.write_text('{"keys": []}')
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)]) == 0
    assert [key["kid"] for key in json.loads(target.read_text())["keys"]] == issuer.published_kids


def test_write_jwks_writes_nothing_without_a_usable_key(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An issuer with no usable key gets no file, and the command exits 1 saying so."""
    issuer.jwks_override = {"keys": [weak_rsa_jwk(1024, kid="weak")]}
    target = tmp_path / "jwks.json"
    assert main(["probe-issuer", issuer.url, "--ca-bundle", str(issuer.ca_path), "--write-jwks", str(target)]) == 1
    assert "not written: the issuer has no usable key" in capsys.readouterr().err
    assert not target.exists()
