"""End to end with the real clients: `python -m id`, twine and pip, through the gateway into a real pypiserver.

This is PyPI's GitLab recipe run against the gateway: the job reads its ID token with `python -m id PYPI`, POSTs
it to /_/oidc/mint-token, and runs `twine upload -u __token__ -p <minted>` to the gateway's /legacy/. The index is
pypiserver with an htpasswd user, which knows nothing of trusted publishing; the gateway (a real `gateway serve`
process) uploads with the operator's credentials. Every tool runs as a subprocess, as it would in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import Key

from gateway.identity import Identity
from gateway.mint import Signer, generate_key
from gateway.testing import TestIssuer
from tests.conftest import gitlab_issuer, write_config
from tests.processes import GatewayProcess, Server, free_port

OPERATOR = ("operator", "operator-secret")
PROJECT = "tinypkg"
VERSION = "0.1.0"
SDIST = f"{PROJECT}-{VERSION}.tar.gz"
WHEEL = f"{PROJECT}-{VERSION}-py2.py3-none-any.whl"  # flit-core tags pure wheels py2.py3
PUBLISHER = {
    "issuer": "gitlab-com",
    "repository": "group/project",
    "workflow": ".gitlab-ci.yml",
    "projects": [PROJECT],
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a CI job: no pip, twine or gateway settings of this machine's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PIP_", "TWINE_", "GATEWAY_", "GITLAB_", "GITHUB_", "PYPI_"))
    }
    return env | {"PIP_CONFIG_FILE": os.devnull, "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"} | extra


@dataclass
class PyPIServer:
    url: str
    packages: Path

    def stored(self) -> list[str]:
        return sorted(path.name for path in self.packages.iterdir())


@contextmanager
def run_pypiserver(root: Path) -> Iterator[PyPIServer]:
    """A real pypiserver on loopback, storing under `root`: uploads need the operator's htpasswd login, downloads are
    open."""
    packages = root / "packages"
    packages.mkdir(parents=True)
    with warnings.catch_warnings():
        # passlib imports the standard library's deprecated `crypt`; pypiserver itself uses passlib the same way.
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.apache import HtpasswdFile
    passwords = HtpasswdFile(str(root / "htpasswd"), new=True)
    passwords.set_password(*OPERATOR)
    passwords.save()
    port = free_port()
    command = [
        sys.executable, "-m", "pypiserver", "run", "--host", "127.0.0.1", "--port", str(port),
        "--passwords", str(root / "htpasswd"), "--authenticate", "update",
        "--disable-fallback", "--server", "wsgiref", str(packages),
    ]  # fmt: skip
    with Server(command, port, root / "pypiserver.log", env=clean_env()).wait("/health") as server:
        yield PyPIServer(server.base, packages)


@pytest.fixture(scope="module")
def pypiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyPIServer]:
    with run_pypiserver(tmp_path_factory.mktemp("pypiserver")) as server:
        yield server


@dataclass
class UploadGateway:
    """A running `gateway serve` with [upstream] set, and the key it signs with."""

    server: GatewayProcess
    key: Key

    @property
    def url(self) -> str:
        return self.server.base

    def mint(self, id_token: str) -> dict[str, object]:
        response = httpx.post(f"{self.url}/_/oidc/mint-token", json={"token": id_token}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@contextmanager
def serve_gateway(
    directory: Path, issuer: TestIssuer, upstream: str, password: str, *, projects: Sequence[str] = (PROJECT,)
) -> Iterator[UploadGateway]:
    """Run `gateway serve` with [upstream] pointing at the index, the password in an environment variable, and one
    publisher for `projects`."""
    directory.mkdir()
    key = generate_key()
    (directory / "key.json").write_text(json.dumps(key.as_dict(private=True)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    publisher = PUBLISHER | {"projects": list(projects)}
    path = write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, [publisher], url=url, signing_key="key.json")
    upstream_table = (
        f'\n[upstream]\nurl = "{upstream}/"\nusername = "{OPERATOR[0]}"\npassword_env = "UPSTREAM_PASSWORD"\n'
    )
    path.write_text(path.read_text() + upstream_table)
    with GatewayProcess(path, port=port, env=clean_env(UPSTREAM_PASSWORD=password)).wait("/readyz") as server:
        yield UploadGateway(server, key)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, _issuer: TestIssuer, pypiserver: PyPIServer
) -> Iterator[UploadGateway]:
    with serve_gateway(tmp_path_factory.mktemp("gw") / "gateway", _issuer, pypiserver.url, OPERATOR[1]) as served:
        yield served


def build(directory: Path, name: str, *, data: int = 0, only: str | None = None) -> list[Path]:
    """Write a tiny project and build its sdist and wheel (or `only` one: "sdist", "wheel") with `python -m build`
    (flit-core, no network); `data` bytes of incompressible package data make it as large as a test needs."""
    source = directory / name
    (source / name).mkdir(parents=True)
    (source / name / "__init__.py").write_text(f'"""{name}: a package for the end-to-end test."""\n')
    if data:
        (source / name / "data.bin").write_bytes(os.urandom(data))
    (source / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["flit_core>=3.4"]\n'
        'build-backend = "flit_core.buildapi"\n'
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{VERSION}"\n'
        f'description = "{name} for the end-to-end test"\n'
    )
    dist = directory / f"{name}-dist"
    which = [f"--{only}"] if only else []
    run(
        [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", *which, "--outdir", str(dist)],
        cwd=source,
    )
    return sorted(dist.iterdir())


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    directory = tmp_path_factory.mktemp("build")
    return {name: build(directory, name) for name in (PROJECT, "otherpkg")}


def run(
    args: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, env=dict(env or clean_env()), cwd=cwd, timeout=120, check=False
    )
    assert result.returncode == 0, f"{args[:4]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def twine(gateway: UploadGateway, password: str, files: list[Path], *, verbose: bool = True) -> tuple[int, str]:
    return twine_upload(gateway.url, password, files, verbose=verbose)


def twine_upload(url: str, password: str, files: list[Path], *, verbose: bool = True) -> tuple[int, str]:
    """`twine upload` of `files` to `url`/legacy/ as a CI job runs it; its exit status and its output."""
    args = [
        sys.executable, "-m", "twine", "--no-color", "upload",
        "--repository-url", f"{url}/legacy/",
        "-u", "__token__", "-p", password,
        "--non-interactive", "--disable-progress-bar",
        *(["--verbose"] if verbose else []),
        *map(str, files),
    ]  # fmt: skip
    # Wide, so rich does not wrap the reason across lines.
    result = subprocess.run(
        args, capture_output=True, text=True, env=clean_env(COLUMNS="250"), timeout=120, check=False
    )
    return result.returncode, ANSI.sub("", result.stdout + result.stderr)


def id_token_from_id(token: str) -> str:
    """`python -m id pypi` in a GitLab CI job: it reads the token GitLab put in $PYPI_ID_TOKEN.

    Lower case, as PyPI's GitLab docs now say: id 1.6 checks the token's `aud` against its argument exactly, so
    the older `python -m id PYPI` fails for `aud: pypi` (the variable name is upper-cased either way).
    """
    result = run([sys.executable, "-m", "id", "pypi"], env=clean_env(GITLAB_CI="true", PYPI_ID_TOKEN=token))
    return result.stdout.strip()


def forged(key: Key, gateway: UploadGateway, *, issued: float) -> str:
    identity = Identity(
        issuer="gitlab-com", issuer_url="https://gitlab.test", kind="gitlab", repository="group/project"
    )
    return (
        Signer(key)
        .mint(identity=identity, projects=[PROJECT], issuer=gateway.url, audience="pypi", ttl=900, now=issued)
        .token
    )


def test_gitlab_recipe_publishes_through_the_gateway(
    gateway: UploadGateway, pypiserver: PyPIServer, _issuer: TestIssuer, dists: dict[str, list[Path]], tmp_path: Path
) -> None:
    """id -> mint-token -> twine upload lands the sdist and wheel in pypiserver, and pip downloads the wheel."""
    id_token = _issuer.gitlab_token()
    assert id_token_from_id(id_token) == id_token
    minted = gateway.mint(id_token)
    assert minted["projects"] == [PROJECT]

    code, output = twine(gateway, str(minted["token"]), dists[PROJECT])
    assert code == 0, output
    assert pypiserver.stored() == sorted([SDIST, WHEEL])
    assert str(minted["token"]) not in output

    simple = httpx.get(f"{pypiserver.url}/simple/{PROJECT}/", timeout=10)
    assert simple.status_code == 200
    assert SDIST in simple.text and WHEEL in simple.text
    built = {path.name: path.read_bytes() for path in dists[PROJECT]}
    sdist_link = re.search(rf'href="([^"#]*{re.escape(SDIST)})', simple.text)
    assert sdist_link is not None
    assert httpx.get(httpx.URL(f"{pypiserver.url}/simple/{PROJECT}/").join(sdist_link[1])).content == built[SDIST]

    downloads = tmp_path / "downloads"
    pip = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
        "--index-url", f"{pypiserver.url}/simple/", "--dest", str(downloads), f"{PROJECT}=={VERSION}",
    ]  # fmt: skip
    run(pip)
    assert (downloads / WHEEL).read_bytes() == built[WHEEL]


def test_project_outside_the_token_is_refused_and_nothing_lands(
    gateway: UploadGateway, pypiserver: PyPIServer, _issuer: TestIssuer, dists: dict[str, list[Path]]
) -> None:
    """twine uploading another project with the minted token fails with 403 and the reason, and nothing is stored."""
    before = pypiserver.stored()
    token = str(gateway.mint(_issuer.gitlab_token())["token"])
    code, output = twine(gateway, token, dists["otherpkg"], verbose=False)
    assert code != 0
    # Without --verbose twine shows only the status line: uvicorn cannot send a custom reason phrase.
    assert f"HTTPError: 403 Forbidden from {gateway.url}/legacy/" in output
    code, output = twine(gateway, token, dists["otherpkg"])
    assert code != 0
    assert "this upload token may not upload to project 'otherpkg'; it allows: tinypkg" in output
    assert pypiserver.stored() == before
    assert httpx.get(f"{pypiserver.url}/simple/otherpkg/", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        pytest.param("expired", "expired", id="expired"),
        pytest.param("foreign", "is not one of the gateway's signing keys", id="foreign-signed"),
    ],
)
def test_expired_or_foreign_minted_token_is_refused(
    gateway: UploadGateway, pypiserver: PyPIServer, dists: dict[str, list[Path]], which: str, reason: str
) -> None:
    """twine with an expired token of the gateway's own key, or a token of another key, gets 403 and the reason."""
    before = pypiserver.stored()
    if which == "expired":
        token = forged(gateway.key, gateway, issued=time.time() - 3600)
    else:
        token = forged(generate_key(), gateway, issued=time.time())
    code, output = twine(gateway, token, dists[PROJECT])
    assert code != 0
    assert f"HTTPError: 403 Forbidden from {gateway.url}/legacy/" in output
    assert "invalid upload token: " in output and reason in output
    assert pypiserver.stored() == before


def test_wrong_upstream_password_is_a_bad_gateway_about_the_operators_credentials(
    tmp_path: Path, pypiserver: PyPIServer, _issuer: TestIssuer, dists: dict[str, list[Path]]
) -> None:
    """With the operator's password wrong, twine reports 502 saying the gateway's index credentials were refused,
    with no page or address of pypiserver's, and nothing is stored."""
    before = pypiserver.stored()
    with serve_gateway(tmp_path / "gateway", _issuer, pypiserver.url, "not-the-password") as gateway:
        token = str(gateway.mint(_issuer.gitlab_token())["token"])
        code, output = twine(gateway, token, dists[PROJECT])
    # Read once the server has stopped: its log writer has written every line by then.
    log = gateway.server.log.read_text()
    assert code != 0
    assert "HTTPError: 502 Bad Gateway" in output, output
    assert "the upstream index refused this gateway's index credentials (403); the upload token is fine" in output
    assert "<title>" not in output and pypiserver.url.removeprefix("http://") not in output
    assert "upstream refused the gateway's credentials (403)" in log
    assert pypiserver.stored() == before
