"""The README's GitLab job recipe, run exactly as written, as GitLab runs it, against a real gateway and pypiserver.

The script is taken from the README's block marked `<!-- recipe: gitlab-job -->` and run with `bash -eo pipefail`
(as GitLab's runner does), with only what GitLab would supply: `GITLAB_CI`, the ID token in the variable its
`id_tokens` entry names, and the `GATEWAY` CI/CD variable. Its first line installs the current `id` and twine into
the job's Python (a fresh virtualenv standing in for the `python:3.12` image), so the job runs with the current
tools. The gateway is a real `gateway serve` with `[upstream]` pointing at a real pypiserver.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.testing import TestIssuer
from tests.test_twine import (
    ANSI,
    PROJECT,
    SDIST,
    WHEEL,
    PyPIServer,
    UploadGateway,
    build,
    clean_env,
    pypiserver,  # noqa: F401 -- a fixture, used by name
    serve_gateway,
)

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parent.parent
MARK = "<!-- recipe: gitlab-job"


@dataclass(frozen=True)
class Recipe:
    script: list[str]
    token_variable: str
    audience: str


def readme_recipe() -> Recipe:
    """The job of the README's marked YAML block: its script lines and its one ID token's variable and audience."""
    readme = (REPOSITORY / "README.md").read_text()
    assert readme.count(MARK) == 1, "the README must mark exactly one GitLab job recipe"
    block = re.search(r"```yaml\n(.*?)```", readme.split(MARK, 1)[1], re.DOTALL)
    assert block is not None, "no ```yaml block after the recipe mark"
    jobs: dict[str, Any] = yaml.safe_load(block[1])
    assert len(jobs) == 1
    (job,) = jobs.values()
    ((variable, token),) = job["id_tokens"].items()
    assert all(isinstance(line, str) for line in job["script"])
    return Recipe(script=job["script"], token_variable=variable, audience=token["aud"])


@dataclass
class Job:
    """What a GitLab runner gives the job: a shell, its Python (with pip), the checked-out project and its dist/."""

    python: Path
    gateway: UploadGateway
    recipe: Recipe

    def run(self, directory: Path, id_token: str) -> tuple[int, str]:
        environ = clean_env() | {
            # pip reaches the registry as this machine does; everything else of the job is GitLab's.
            **{name: value for name, value in os.environ.items() if name.startswith("PIP_")},
            "PATH": f"{self.python.parent}{os.pathsep}{os.environ['PATH']}",
            "CI": "true",
            "GITLAB_CI": "true",
            self.recipe.token_variable: id_token,
            "GATEWAY": self.gateway.url,
        }
        environ.pop("PIP_CONFIG_FILE", None)
        environ.pop("VIRTUAL_ENV", None)
        result = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", "\n".join(self.recipe.script)],
            cwd=directory,
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return result.returncode, ANSI.sub("", result.stdout + result.stderr)


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory,
    _issuer: TestIssuer,
    pypiserver: PyPIServer,  # noqa: F811 -- the fixture imported above
) -> Iterator[Job]:
    recipe = readme_recipe()
    venv = tmp_path_factory.mktemp("job") / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    directory = tmp_path_factory.mktemp("recipe") / "gateway"
    with serve_gateway(directory, _issuer, pypiserver.url, "operator-secret") as gateway:
        yield Job(venv / "bin" / "python", gateway, recipe)


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checked-out projects with their built dist/: the publisher's project, and one it may not upload."""
    built = tmp_path_factory.mktemp("build")
    checkouts = {}
    for name in (PROJECT, "otherpkg"):
        checkout = tmp_path_factory.mktemp(name)
        (checkout / "dist").mkdir()
        for file in build(built, name):
            shutil.copy(file, checkout / "dist")
        checkouts[name] = checkout
    return checkouts


def flat(text: str) -> str:
    """`text` with every run of whitespace as one space: rich wraps twine's lines at the terminal width."""
    return " ".join(text.split())


def refusal(gateway: UploadGateway, id_token: str) -> str:
    """The description mint-token gives for `id_token`, asked directly."""
    response = httpx.post(f"{gateway.url}/_/oidc/mint-token", json={"token": id_token}, timeout=10)
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    return f"mint-token refused: {error['code']} - {error['description']}"


def test_recipe_is_what_gitlab_and_the_gateway_expect() -> None:
    """The recipe's ID token is requested for the gateway's audience, `pypi`, and is read by `python -m id pypi`."""
    recipe = readme_recipe()
    assert recipe.audience == "pypi"
    assert recipe.token_variable == "PYPI_ID_TOKEN"  # the variable `id`'s GitLab detector reads for audience pypi
    assert any("python -m id pypi" in line for line in recipe.script)


def test_recipe_publishes(job: Job, projects: dict[str, Path], pypiserver: PyPIServer, _issuer: TestIssuer) -> None:  # noqa: F811
    """With a good ID token the job succeeds and the sdist and wheel land in the index; no token shows in its log."""
    id_token = _issuer.gitlab_token()
    code, output = job.run(projects[PROJECT], id_token)
    assert code == 0, output
    assert {SDIST, WHEEL} <= set(pypiserver.stored())
    assert id_token not in output
    assert "mint-token" not in output  # nothing to report


def test_recipe_reports_a_replayed_token(job: Job, projects: dict[str, Path], _issuer: TestIssuer) -> None:
    """With an ID token already exchanged, the job fails at the exchange and its log holds the gateway's reason."""
    id_token = _issuer.gitlab_token()
    httpx.post(f"{job.gateway.url}/_/oidc/mint-token", json={"token": id_token}, timeout=10).raise_for_status()
    code, output = job.run(projects[PROJECT], id_token)
    assert code != 0
    reason = refusal(job.gateway, id_token)
    assert "invalid-reuse-token" in reason
    assert reason in output, output
    assert "mint-token failed (curl exit 22)" in output
    assert "Uploading" not in output  # it stopped there: twine never ran


def test_recipe_reports_a_repository_without_publisher(
    job: Job, projects: dict[str, Path], _issuer: TestIssuer
) -> None:
    """A job of a repository no publisher names fails at the exchange with the gateway's invalid-publisher reason."""
    code, output = job.run(projects[PROJECT], _issuer.gitlab_token(project_path="group/other"))
    assert code != 0
    reason = refusal(job.gateway, _issuer.gitlab_token(project_path="group/other"))
    assert "invalid-publisher" in reason
    assert reason in output, output
    assert "Uploading" not in output


def test_recipe_reports_a_foreign_project(
    job: Job, projects: dict[str, Path], pypiserver: PyPIServer, _issuer: TestIssuer  # noqa: F811
) -> None:
    """Uploading a project the publisher does not grant fails, and the log holds the gateway's reason from twine."""
    before = pypiserver.stored()
    code, output = job.run(projects["otherpkg"], _issuer.gitlab_token())
    assert code != 0
    assert "this upload token may not upload to project 'otherpkg'; it allows: tinypkg" in flat(output), output
    assert "403 Forbidden" in output
    assert pypiserver.stored() == before
