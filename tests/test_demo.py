"""`gateway demo`: the whole exchange on loopback, run as a user would run it, in its own process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_exits_0_and_prints_the_verified_claims(tmp_path: Path) -> None:
    """The demo mints a token, verifies it against the served JWKS, prints its claims, and leaves nothing behind."""
    # Its own temporary directory, so "nothing left behind" is checked where the demo writes.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from gateway.demo import main; sys.exit(main())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    steps = re.findall(r"^\[(\d)/7\]", out, flags=re.MULTILINE)
    assert steps == [str(n) for n in range(1, 8)]
    assert "POST /_/oidc/mint-token -> 200" in out
    assert "-> 422 invalid-reuse-token" in out

    gateway_url = re.search(r"gateway serving at (http://127\.0\.0\.1:\d+)", out)
    assert gateway_url is not None
    block = out.split("verified the minted token with gateway.verify", 1)[1].split("\n[7/7]", 1)[0]
    claims = json.loads("\n".join(line for line in block.splitlines()[1:]))
    assert claims["iss"] == gateway_url[1]
    assert claims["aud"] == "pypi"
    assert claims["sub"] == "gitlab-com:group/project"
    assert claims["projects"] == ["sampleproject"]
    assert claims["exp"] - claims["iat"] == 900
    assert claims["identity"]["repository"] == "group/project"
    assert out.rstrip().endswith("demo ok")
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
