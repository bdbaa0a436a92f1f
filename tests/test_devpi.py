"""End to end with a second real index: twine through `gateway serve` into devpi-server, and what devpi taught.

devpi reads an upload's form with WebOb and the `cgi` module, differently from pypiserver's bottle in three ways
that let a body mean one thing to the gateway and another to the index: a part's `charset` parameter (devpi
decodes the file name `good-7.3+AGUAdgBpAGw.tar.gz` as UTF-7 and stores `good-7.3evil.tar.gz`), the `version`
field (devpi registers it, whatever the file name says), and `name` (lower-cased with `str.lower()`, under which
U+212A KELVIN SIGN becomes "k"). Each such body is sent through the gateway to devpi and to pypiserver: refused
with 400, nothing stored in either; the same body without the trick is stored under the name the gateway checked.

devpi-server runs on loopback, offline, from a fresh server directory; its key derivation (argon2) is turned down
to test strength, which only speeds up its start.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.testing import TestIssuer
from tests.processes import Server, free_port
from tests.test_multipart import CLOSE, CONTENT_TYPE, part
from tests.test_twine import (
    OPERATOR,
    PROJECT,
    SDIST,
    VERSION,
    WHEEL,
    PyPIServer,
    UploadGateway,
    build,
    clean_env,
    run_pypiserver,
    serve_gateway,
    twine,
)

DEVPI_SERVER = shutil.which("devpi-server", path=str(Path(sys.executable).parent))
DEVPI_INIT = shutil.which("devpi-init", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(
    DEVPI_SERVER is None or DEVPI_INIT is None, reason="devpi-server is not installed (pip install devpi-server)"
)
INDEX = "operator/dev"


@dataclass
class Devpi:
    base: str

    @property
    def upload_url(self) -> str:
        return f"{self.base}/{INDEX}"

    def stored(self, project: str = PROJECT) -> list[str]:
        """The file names devpi serves for `project` on the index (none if it does not know the project)."""
        response = httpx.get(f"{self.base}/{INDEX}/{project}", headers={"Accept": "application/json"}, timeout=10)
        if response.status_code == 404:
            return []
        assert response.status_code == 200, response.text
        return sorted(
            link["href"].rsplit("/", 1)[1]
            for release in response.json()["result"].values()
            for link in release.get("+links", [])
        )

    def versions(self, project: str = PROJECT) -> list[str]:
        response = httpx.get(f"{self.base}/{INDEX}/{project}", headers={"Accept": "application/json"}, timeout=10)
        return sorted(response.json()["result"]) if response.status_code == 200 else []


@pytest.fixture(scope="module")
def devpi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devpi]:
    """A real devpi-server on loopback with the operator's user and a non-volatile index, operator/dev."""
    assert DEVPI_SERVER is not None and DEVPI_INIT is not None
    root = tmp_path_factory.mktemp("devpi")
    env = clean_env()
    subprocess.run(
        [DEVPI_INIT, "--serverdir", str(root / "server"), "--no-root-pypi"],
        capture_output=True,
        env=env,
        timeout=120,
        check=True,
    )
    port = free_port()
    command = [
        DEVPI_SERVER, "--serverdir", str(root / "server"), "--host", "127.0.0.1", "--port", str(port),
        "--offline-mode", "--argon2-memory-cost", "8", "--argon2-time-cost", "1", "--argon2-parallelism", "1",
    ]  # fmt: skip
    with Server(command, port, root / "devpi.log", env=env).wait("/+api", timeout=120) as server:
        json_headers = {"Accept": "application/json", "Content-Type": "application/json"}
        user = httpx.put(f"{server.base}/{OPERATOR[0]}", json={"password": OPERATOR[1]}, headers=json_headers)
        assert user.status_code == 201, user.text
        index = httpx.put(
            f"{server.base}/{INDEX}",
            json={"type": "stage", "bases": [], "volatile": False},
            headers=json_headers,
            auth=OPERATOR,
        )
        assert index.status_code == 200, index.text
        yield Devpi(server.base)


@pytest.fixture(scope="module")
def pypiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyPIServer]:
    with run_pypiserver(tmp_path_factory.mktemp("pypiserver")) as server:
        yield server


@pytest.fixture(scope="module")
def devpi_gateway(
    tmp_path_factory: pytest.TempPathFactory, _issuer: TestIssuer, devpi: Devpi
) -> Iterator[UploadGateway]:
    with serve_gateway(tmp_path_factory.mktemp("gw") / "gateway", _issuer, devpi.upload_url, OPERATOR[1]) as served:
        yield served


@pytest.fixture(scope="module")
def pypiserver_gateway(
    tmp_path_factory: pytest.TempPathFactory, _issuer: TestIssuer, pypiserver: PyPIServer
) -> Iterator[UploadGateway]:
    with serve_gateway(tmp_path_factory.mktemp("gw") / "gateway", _issuer, pypiserver.url, OPERATOR[1]) as served:
        yield served


def test_twine_publishes_to_devpi_through_the_gateway(
    devpi_gateway: UploadGateway, devpi: Devpi, _issuer: TestIssuer, tmp_path: Path
) -> None:
    """id token -> mint-token -> twine upload lands the sdist and wheel in devpi, registered as their version."""
    dists = build(tmp_path, PROJECT)
    token = str(devpi_gateway.mint(_issuer.gitlab_token())["token"])
    code, output = twine(devpi_gateway, token, dists)
    assert code == 0, output
    assert devpi.stored() == sorted([SDIST, WHEEL])
    assert devpi.versions() == [VERSION]
    served = httpx.get(f"{devpi.base}/{INDEX}/+simple/{PROJECT}/", timeout=10)
    assert SDIST in served.text and WHEEL in served.text

    # Other bytes under the same name: devpi refuses to overwrite (it skips an identical file), and the job reads
    # devpi's reason, not its page or its address.
    (tmp_path / "again").mkdir()
    (changed,) = build(tmp_path / "again", PROJECT, data=16, only="sdist")
    assert changed.name == SDIST
    code, output = twine(devpi_gateway, str(devpi_gateway.mint(_issuer.gitlab_token())["token"]), [changed])
    assert code != 0
    assert "HTTPError: 409 Conflict" in output, output
    assert "the upstream index refused the upload (409):" in output, output
    assert "<" not in output.split("(409):", 1)[1].split("\n", 1)[0]
    assert devpi.base.removeprefix("http://") not in output


def form(
    *,
    name: str = "trickpkg",
    version: str = "7.3",
    filename: str = "trickpkg-7.3.tar.gz",
    media_type: str = "application/octet-stream",
    name_part_type: str | None = None,
) -> bytes:
    """An upload body as twine builds it, with the knobs each of devpi's readings needs."""
    extra = f"Content-Type: {name_part_type}\r\n" if name_part_type else ""
    return (
        part(":action", "file_upload")
        + part("protocol_version", "1")
        + part("name", name, extra=extra)
        + part("version", version)
        + part("filetype", "sdist")
        + part("content", b"an sdist's bytes", filename=filename, media_type=media_type)
        + CLOSE
    )


UTF7_NAME = "trickpkg-7.3+AGUAdgBpAGw.tar.gz"  # "+AGUAdgBpAGw" is UTF-7 for "evil"
TRICKS = [
    pytest.param(
        form(filename=UTF7_NAME, media_type="application/octet-stream; charset=utf-7"),
        "bare Content-Type",
        id="utf-7-file-name",
    ),
    pytest.param(
        form(name_part_type="text/plain; charset=utf-7"), "must not have a Content-Type", id="charset-on-name"
    ),
    pytest.param(form(version="good"), "is not a PEP 440 version", id="version-not-a-version"),
    pytest.param(form(version="6.1"), "not of the 'version' field's version", id="version-not-the-files"),
    pytest.param(form(name="tric\u212apkg"), "is not a project name", id="kelvin-sign-name"),
]


def upload(gateway: UploadGateway, issuer: TestIssuer, body: bytes) -> httpx.Response:
    token = str(gateway.mint(issuer.gitlab_token())["token"])
    credentials = base64.b64encode(f"__token__:{token}".encode()).decode()
    headers = {"Content-Type": CONTENT_TYPE, "Authorization": f"Basic {credentials}"}
    return httpx.post(f"{gateway.url}/legacy/", content=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def trick_gateways(
    tmp_path_factory: pytest.TempPathFactory, _issuer: TestIssuer, devpi: Devpi, pypiserver: PyPIServer
) -> Iterator[dict[str, UploadGateway]]:
    """A gateway in front of each index whose publisher may upload `trickpkg`, which the KELVIN SIGN's
    "tric\u212apkg" lower-cases to."""
    projects = ("trickpkg",)
    with (
        serve_gateway(
            tmp_path_factory.mktemp("gw") / "devpi", _issuer, devpi.upload_url, OPERATOR[1], projects=projects
        ) as to_devpi,
        serve_gateway(
            tmp_path_factory.mktemp("gw") / "pypi", _issuer, pypiserver.url, OPERATOR[1], projects=projects
        ) as to_pypiserver,
    ):
        yield {"devpi": to_devpi, "pypiserver": to_pypiserver}


def stored(which: str, devpi: Devpi, pypiserver: PyPIServer) -> list[str]:
    if which == "devpi":
        return devpi.stored("trickpkg")
    return pypiserver.stored()


@pytest.mark.parametrize("which", ["devpi", "pypiserver"])
@pytest.mark.parametrize(("body", "fragment"), TRICKS)
def test_form_an_index_would_read_differently_is_refused_and_nothing_is_stored(
    trick_gateways: dict[str, UploadGateway],
    devpi: Devpi,
    pypiserver: PyPIServer,
    _issuer: TestIssuer,
    which: str,
    body: bytes,
    fragment: str,
) -> None:
    """Each body devpi reads differently from the gateway is refused with 400 and the reason, in front of devpi and
    of pypiserver alike, and the index stores nothing."""
    before = stored(which, devpi, pypiserver)
    response = upload(trick_gateways[which], _issuer, body)
    assert response.status_code == 400, response.text
    assert fragment in response.text
    assert stored(which, devpi, pypiserver) == before


@pytest.mark.parametrize("which", ["devpi", "pypiserver"])
def test_the_same_form_without_the_trick_is_stored_as_checked(
    trick_gateways: dict[str, UploadGateway], devpi: Devpi, pypiserver: PyPIServer, _issuer: TestIssuer, which: str
) -> None:
    """The trick bodies' plain twin (bare media type, no charset, matching version, ASCII name) is stored by either
    index under exactly the file name the gateway checked: the refusals above are the gateway's, not the index's."""
    before = stored(which, devpi, pypiserver)
    filename = "trickpkg-7.3.tar.gz"
    response = upload(trick_gateways[which], _issuer, form(filename=filename))
    assert response.status_code == 200, response.text
    assert stored(which, devpi, pypiserver) == sorted([*before, filename])
    if which == "devpi":
        assert devpi.versions("trickpkg") == ["7.3"]
