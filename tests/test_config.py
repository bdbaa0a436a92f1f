"""gateway/config.load on real files: what a valid config becomes, and how each mistake is reported."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import trustme
from joserfc.jwk import ECKey, RSAKey

from gateway import config
from gateway.config import MAX_LEEWAY, Issuer, Settings
from gateway.errors import ConfigError
from gateway.jose import MAX_LIFETIME
from gateway.mint import generate_key
from gateway.publishers import Publisher
from tests.conftest import PUBLISHER, write_config

REPOSITORY = Path(__file__).resolve().parent.parent

GITLAB_COM = {"url": "https://gitlab.com", "kind": "gitlab"}
ISSUERS: dict[str, dict[str, Any]] = {"gitlab-com": GITLAB_COM}


def problems_of(path: Path, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        config.load(path, environ={} if environ is None else environ)
    return raised.value.problems


def load(path: Path, environ: dict[str, str] | None = None) -> Settings:
    return config.load(path, environ={} if environ is None else environ)


# --- valid configs -----------------------------------------------------------------------------------------------


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    """A config with only the required keys loads, with the documented defaults for everything else."""
    path = tmp_path / "issuers.toml"
    path.write_text(
        '[gateway]\naudience = "pypi"\nurl = "https://gateway.example/"\n\n'
        '[issuers.gitlab-com]\nurl = "https://gitlab.com"\nkind = "gitlab"\n'
    )
    (tmp_path / "publishers.toml").write_text("")
    settings = load(path)
    assert settings.audience == "pypi"
    # A trailing slash would make the minted `iss` differ from the discovery document's.
    assert settings.url == "https://gateway.example"
    assert dict(settings.issuers) == {"gitlab-com": Issuer(name="gitlab-com", url="https://gitlab.com", kind="gitlab")}
    assert settings.issuers["gitlab-com"].algorithms == ("RS256",)
    assert settings.by_url == {"https://gitlab.com": settings.issuers["gitlab-com"]}
    assert settings.publishers == ()
    assert (settings.token_ttl, settings.leeway, settings.redis_url, settings.signing_key) == (900, 30, None, None)


def test_publishers_load_with_every_field(tmp_path: Path) -> None:
    """Publisher entries become Publisher records with their projects PEP 503-normalized and deduplicated."""
    entry = PUBLISHER | {
        "environment": "release",
        "owner_id": "12885807",
        "projects": ["Sample_Project", "sample.project", "other"],
    }
    settings = load(write_config(tmp_path, ISSUERS, [entry, PUBLISHER], token_ttl=600, leeway=0))
    assert settings.publishers == (
        Publisher(
            issuer="gitlab-com",
            repository="group/project",
            workflow=".gitlab-ci.yml",
            projects=("sample-project", "other"),
            environment="release",
            owner_id="12885807",
        ),
        Publisher(
            issuer="gitlab-com", repository="group/project", workflow=".gitlab-ci.yml", projects=("sampleproject",)
        ),
    )
    assert (settings.token_ttl, settings.leeway) == (600, 0)


def test_vetting_keys_load(tmp_path: Path) -> None:
    """Issuer require_pins, max_token_age, deny and require_protected_environment, and publisher repository_id and
    refs, load into the records the exchange reads."""
    issuers = issuer_with(
        require_pins=True,
        max_token_age=120,
        require_protected_environment=True,
        deny={"pipeline_source": ["merge_request_event", "schedule"], "runner_id": [7, True]},
    )
    entry = PUBLISHER | {"repository_id": "61254376", "owner_id": "12885807", "refs": ["refs/tags/v*"]}
    settings = load(write_config(tmp_path, issuers, [entry]))
    issuer = settings.issuers["gitlab-com"]
    assert (issuer.require_pins, issuer.max_token_age) == (True, 120)
    assert issuer.deny == (("pipeline_source", ("merge_request_event", "schedule")), ("runner_id", (7, True)))
    assert issuer.options.require_protected_environment is True
    [publisher] = settings.publishers
    assert (publisher.repository_id, publisher.owner_id, publisher.refs) == ("61254376", "12885807", ("refs/tags/v*",))


def test_repository_issuers_toml_trusts_gitlab_com_only() -> None:
    """The repository's own issuers.toml loads and trusts https://gitlab.com and nothing else."""
    settings = load(REPOSITORY / "issuers.toml")
    assert [(i.name, i.url, i.kind, i.namespaces) for i in settings.issuers.values()] == [
        ("gitlab-com", "https://gitlab.com", "gitlab", ())
    ]


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publishers, signing_key and ca_bundle are found relative to the config file, not the working directory."""
    directory = tmp_path / "conf"
    (directory / "sub").mkdir(parents=True)
    (directory / "keys").mkdir()
    (directory / "certs").mkdir()
    ca.cert_pem.write_to_path(str(directory / "certs" / "ca.pem"))
    key = generate_key()
    (directory / "keys" / "signing.json").write_text(json.dumps(key.as_dict(private=True)))
    # By hand: write_config's own `publishers` parameter is the entries, not the [gateway] key.
    path = directory / "issuers.toml"
    path.write_text(
        '[gateway]\naudience = "pypi"\nurl = "https://gateway.example"\npublishers = "sub/publishers.toml"\n'
        'signing_key = "keys/signing.json"\n\n'
        '[issuers.gitlab-com]\nurl = "https://gitlab.com"\nkind = "gitlab"\nca_bundle = "certs/ca.pem"\n'
    )
    (directory / "sub" / "publishers.toml").write_text(
        '[[publisher]]\nissuer = "gitlab-com"\nrepository = "group/project"\nworkflow = ".gitlab-ci.yml"\n'
        'projects = ["sampleproject"]\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load(path)
    assert settings.issuers["gitlab-com"].ca_bundle == directory / "certs" / "ca.pem"
    assert settings.signing_key is not None
    assert settings.signing_key.thumbprint() == key.thumbprint()
    assert [p.repository for p in settings.publishers] == ["group/project"]


@pytest.mark.parametrize(
    ("in_file", "environ", "expected"),
    [
        pytest.param("redis://file:6379/0", {}, "redis://file:6379/0", id="file-only"),
        pytest.param(
            "redis://file:6379/0", {"GATEWAY_REDIS_URL": "redis://env:6379/1"}, "redis://env:6379/1", id="env-wins"
        ),
        pytest.param(None, {"GATEWAY_REDIS_URL": "rediss://env:6380/2"}, "rediss://env:6380/2", id="env-only"),
        pytest.param(None, {}, None, id="neither"),
    ],
)
def test_gateway_redis_url_environment_overrides_file(
    tmp_path: Path, in_file: str | None, environ: dict[str, str], expected: str | None
) -> None:
    """$GATEWAY_REDIS_URL overrides [gateway] redis_url, which applies when the variable is unset."""
    settings = load(write_config(tmp_path, ISSUERS, [PUBLISHER], redis_url=in_file), environ)
    assert settings.redis_url == expected


def test_bad_gateway_redis_url_is_reported(tmp_path: Path) -> None:
    """A $GATEWAY_REDIS_URL that is not a Redis URL is a load error on [gateway] redis_url that names the variable."""
    problems = problems_of(write_config(tmp_path, ISSUERS), {"GATEWAY_REDIS_URL": "http://redis:6379"})
    assert problems == (
        "issuers.toml: [gateway] redis_url: must be a redis://, rediss://, unix://, redis+sentinel://, "
        "rediss+sentinel://, redis+cluster:// or rediss+cluster:// URL (from $GATEWAY_REDIS_URL)",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379,s2:26379", "must name the Sentinel service"),
        ("redis+sentinel://s1,s2:26379/mymaster", "has a node 's1' that is not HOST:PORT"),
        ("redis+sentinel://s1:26379/mymaster/zero", "must end in /SERVICE or /SERVICE/DB"),
        ("redis+cluster://n1:7000,n2:70000", "has a node 'n2:70000' whose port is not a number from 1 to 65535"),
        ("redis+cluster://n1:7000/3", "must have no path: a Cluster has one database (0)"),
        ("redis+cluster://n1:7000?ssl_ca_certs=/ca.pem", "has TLS options but is not a rediss+cluster:// URL"),
        ("rediss+cluster://n1:7000?timeout=1", "has an unknown query option 'timeout'"),
        ("redis://r1:6379,r2:6379/0", "names several hosts: use redis+sentinel:// or redis+cluster://"),
        ("redis://r1:6379/zero", "has a database 'zero' that is not a number"),
    ],
)
def test_malformed_redis_urls_are_config_errors(tmp_path: Path, url: str, message: str) -> None:
    """A malformed Sentinel, Cluster or single-server redis_url is a load error naming the field and the fault."""
    (problem,) = problems_of(write_config(tmp_path, ISSUERS, redis_url=url))
    assert problem.startswith(f"issuers.toml: [gateway] redis_url: {message}")
    assert "$GATEWAY_REDIS_URL" not in problem


def test_redis_url_problem_never_shows_its_password(tmp_path: Path) -> None:
    """The message for a malformed redis_url does not repeat the password in it."""
    (problem,) = problems_of(write_config(tmp_path, ISSUERS, redis_url="redis+sentinel://:s3cret@s1:26379"))
    assert "s3cret" not in problem


def test_replica_acks_and_sentinel_password_load(tmp_path: Path) -> None:
    """The replica-ack keys and redis_sentinel_password load; $GATEWAY_REDIS_SENTINEL_PASSWORD wins over the file."""
    path = write_config(
        tmp_path,
        ISSUERS,
        redis_url="rediss+sentinel://user:pw@s1:26379,s2:26380/mymaster/2?ssl_ca_certs=/ca.pem",
        redis_replica_acks=1,
        redis_replica_ack_timeout=0.25,
        redis_sentinel_password="from-file",
    )
    settings = load(path)
    assert (settings.redis_replica_acks, settings.redis_replica_ack_timeout) == (1, 0.25)
    assert settings.redis_sentinel_password == "from-file"
    assert "from-file" not in repr(settings)
    assert load(path, {"GATEWAY_REDIS_SENTINEL_PASSWORD": "from-env"}).redis_sentinel_password == "from-env"


def test_replica_ack_defaults(tmp_path: Path) -> None:
    """Without the keys, a spend waits for no replica, with a 0.5 s timeout, and sentinels need no password."""
    settings = load(write_config(tmp_path, ISSUERS))
    assert (settings.redis_replica_acks, settings.redis_replica_ack_timeout) == (0, 0.5)
    assert settings.redis_sentinel_password is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("redis_replica_acks", -1, "must be between 0 and 100 (got -1)"),
        ("redis_replica_acks", 1.5, "must be an integer (got float)"),
        ("redis_replica_ack_timeout", 0, "must be between 0.001 and 60 (got 0)"),
    ],
)
def test_bad_replica_ack_settings(tmp_path: Path, key: str, value: Any, message: str) -> None:
    """Negative or fractional acks, and an ack timeout of 0 (WAIT would block for ever), are load errors."""
    assert problems_of(write_config(tmp_path, ISSUERS, **{key: value})) == (
        f"issuers.toml: [gateway] {key}: {message}",
    )


@pytest.mark.parametrize(
    ("cli", "environ", "expected"),
    [
        pytest.param("cli.toml", {"GATEWAY_CONFIG": "env.toml"}, "cli.toml", id="cli-wins"),
        pytest.param(None, {"GATEWAY_CONFIG": "env.toml"}, "env.toml", id="env"),
        pytest.param(None, {}, "issuers.toml", id="default"),
    ],
)
def test_config_path_precedence(cli: str | None, environ: dict[str, str], expected: str) -> None:
    """The config path is --config, else $GATEWAY_CONFIG, else ./issuers.toml."""
    assert config.config_path(cli, environ) == Path(expected)


# --- load errors -------------------------------------------------------------------------------------------------


def issuer_with(**fields: Any) -> dict[str, dict[str, Any]]:
    return {"gitlab-com": GITLAB_COM | fields}


def publisher_with(**fields: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in (PUBLISHER | fields).items() if v is not None}]


BAD_CONFIGS = [
    # (issuers, publishers, [gateway] keys, expected start of the one problem line, fragment)
    pytest.param(
        ISSUERS, publisher_with(refs=[]), {}, "publishers.toml: [[publisher]] #1 refs:", "at least one", id="refs-empty"
    ),
    pytest.param(
        ISSUERS, publisher_with(refs=["v*"]), {}, "publishers.toml: [[publisher]] #1 refs:", "full ref", id="refs-short"
    ),
    pytest.param(
        issuer_with(require_pins=True),
        publisher_with(owner_id="12885807"),
        {},
        "publishers.toml: [[publisher]] #1 repository_id:",
        "require_pins = true. Run `gateway explain TOKEN`",
        id="require-pins-without-repository-id",
    ),
    pytest.param(
        issuer_with(require_pins=True),
        publisher_with(repository_id="61254376"),
        {},
        "publishers.toml: [[publisher]] #1 owner_id:",
        "it prints the repository_id and owner_id to pin",
        id="require-pins-without-owner-id",
    ),
    pytest.param(
        issuer_with(max_token_age=0),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] max_token_age:",
        "between 1",
        id="max-token-age-zero",
    ),
    pytest.param(
        issuer_with(deny={"event_name": []}),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com.deny] event_name:",
        "non-empty list",
        id="deny-empty-list",
    ),
    pytest.param(
        issuer_with(deny={"event_name": "push"}),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com.deny] event_name:",
        "non-empty list",
        id="deny-not-a-list",
    ),
    pytest.param(
        issuer_with(deny={"score": [1.5]}),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com.deny] score:",
        "strings, integers or true/false",
        id="deny-float",
    ),
    pytest.param(
        {
            "gh": {
                "url": "https://token.actions.githubusercontent.com",
                "kind": "github",
                "require_protected_environment": True,
            }
        },
        [],
        {},
        "issuers.toml: [issuers.gh] require_protected_environment:",
        "unknown key",
        id="protected-environment-is-gitlab-only",
    ),
    pytest.param(
        ISSUERS, [], {"colour": "blue"}, "issuers.toml: [gateway] colour:", "unknown key", id="unknown-gateway-key"
    ),
    pytest.param(
        issuer_with(namespace=["atlas"]),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] namespace:",
        "unknown key",
        id="unknown-issuer-key",
    ),
    pytest.param(ISSUERS, [], {"url": None}, "issuers.toml: [gateway] url:", "is required", id="missing-gateway-url"),
    pytest.param(
        ISSUERS, [], {"url": "ftp://gateway"}, "issuers.toml: [gateway] url:", "http(s) URL", id="gateway-url-scheme"
    ),
    pytest.param(
        issuer_with(url="http://gitlab.com"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] url:",
        "must be an https URL",
        id="http-issuer-url",
    ),
    pytest.param(
        issuer_with(url="https://gitlab.com/?x=1"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] url:",
        "no query or fragment",
        id="issuer-url-query",
    ),
    pytest.param(
        issuer_with(url="https://gitlab.com?"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] url:",
        "no query or fragment",
        id="issuer-url-empty-query",
    ),
    pytest.param(
        issuer_with(url="https://gitlab.com/#top"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] url:",
        "no query or fragment",
        id="issuer-url-fragment",
    ),
    pytest.param(
        issuer_with(url="https://user@gitlab.com"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] url:",
        "https URL",
        id="issuer-url-userinfo",
    ),
    pytest.param(
        {"gitlab-com": GITLAB_COM, "mirror": GITLAB_COM},
        [],
        {},
        "issuers.toml: [issuers.mirror] url:",
        "duplicates the url of [issuers.gitlab-com]",
        id="duplicate-issuer-url",
    ),
    pytest.param(
        issuer_with(kind="bitbucket"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] kind:",
        "(got 'bitbucket')",
        id="unknown-kind",
    ),
    pytest.param(
        {"gitlab-com": {"url": "https://gitlab.com"}},
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] kind:",
        "is required",
        id="missing-kind",
    ),
    pytest.param(
        issuer_with(ca_bundle="missing-ca.pem"),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] ca_bundle:",
        "missing-ca.pem is not a readable PEM",
        id="ca-bundle-missing",
    ),
    pytest.param(
        issuer_with(algorithms=["RS256", "HS256"]),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] algorithms:",
        "'HS256' is not allowed",
        id="algorithm-hs256",
    ),
    pytest.param(
        issuer_with(algorithms=["none"]),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] algorithms:",
        "'none' is not allowed",
        id="algorithm-none",
    ),
    pytest.param(
        issuer_with(namespaces=["/atlas"]),
        [],
        {},
        "issuers.toml: [issuers.gitlab-com] namespaces:",
        "without leading or trailing '/'",
        id="namespace-leading-slash",
    ),
    pytest.param(
        ISSUERS, [], {"token_ttl": True}, "issuers.toml: [gateway] token_ttl:", "(got bool)", id="token-ttl-bool"
    ),
    pytest.param(
        ISSUERS, [], {"token_ttl": "900"}, "issuers.toml: [gateway] token_ttl:", "(got str)", id="token-ttl-string"
    ),
    pytest.param(
        ISSUERS, [], {"token_ttl": 10}, "issuers.toml: [gateway] token_ttl:", "between 60 and", id="ttl-small"
    ),
    pytest.param(
        ISSUERS, [], {"leeway": -1}, "issuers.toml: [gateway] leeway:", "between 0 and 300", id="leeway-negative"
    ),
    pytest.param(
        ISSUERS,
        [],
        {"replay_fallback": "yes"},
        "issuers.toml: [gateway] replay_fallback:",
        "true or false",
        id="replay-fallback-string",
    ),
    pytest.param(
        ISSUERS,
        [],
        {"signing_key": "no-such-key.json"},
        "issuers.toml: [gateway] signing_key:",
        "no-such-key.json: not found; make one with `gateway keygen --out ",
        id="signing-key-missing",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(issuer="nowhere"),
        {},
        "publishers.toml: [[publisher]] #1 issuer:",
        "names no issuer in [issuers] (got 'nowhere')",
        id="publisher-unknown-issuer",
    ),
    pytest.param(
        issuer_with(namespaces=["atlas"]),
        publisher_with(repository="atlas-evil/x"),
        {},
        "publishers.toml: [[publisher]] #1 repository:",
        "outside the namespaces of [issuers.gitlab-com] (atlas)",
        id="publisher-outside-namespaces",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(projects=None),
        {},
        "publishers.toml: [[publisher]] #1 projects:",
        "is required",
        id="publisher-missing-projects",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(projects=[]),
        {},
        "publishers.toml: [[publisher]] #1 projects:",
        "at least one project",
        id="publisher-empty-projects",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(workflow=None),
        {},
        "publishers.toml: [[publisher]] #1 workflow:",
        "is required",
        id="publisher-missing-workflow",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(workflow="../other/.gitlab-ci.yml"),
        {},
        "publishers.toml: [[publisher]] #1 workflow:",
        "relative to the repository root",
        id="publisher-workflow-escapes",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(projects=["-sample"]),
        {},
        "publishers.toml: [[publisher]] #1 projects:",
        "'-sample' is not a valid project name",
        id="project-leading-dash",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(projects=["sample project"]),
        {},
        "publishers.toml: [[publisher]] #1 projects:",
        "'sample project' is not a valid project name",
        id="project-space",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(projects=["sampl\u00e9"]),
        {},
        "publishers.toml: [[publisher]] #1 projects:",
        "is not a valid project name",
        id="project-non-ascii",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(repository="gr\u00f6up/project"),
        {},
        "publishers.toml: [[publisher]] #1 repository:",
        "must be ASCII",
        id="repository-non-ascii",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(repository="group/\u212ait"),
        {},
        "publishers.toml: [[publisher]] #1 repository:",
        "must be ASCII",
        id="repository-kelvin-sign",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(repository="project"),
        {},
        "publishers.toml: [[publisher]] #1 repository:",
        "full path",
        id="repository-one-segment",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(repository="group//project"),
        {},
        "publishers.toml: [[publisher]] #1 repository:",
        "full path",
        id="repository-double-slash",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(owner_id=12885807),
        {},
        "publishers.toml: [[publisher]] #1 owner_id:",
        "must be a string (got int)",
        id="owner-id-integer",
    ),
    pytest.param(
        ISSUERS,
        publisher_with(branch="main"),
        {},
        "publishers.toml: [[publisher]] #1 branch:",
        "unknown key",
        id="publisher-unknown-key",
    ),
]


@pytest.mark.parametrize(("issuers", "publishers", "gateway", "where", "fragment"), BAD_CONFIGS)
def test_load_error_names_file_table_and_field(
    tmp_path: Path,
    issuers: dict[str, Any],
    publishers: list[dict[str, Any]],
    gateway: dict[str, Any],
    where: str,
    fragment: str,
) -> None:
    """Each mistake is one load error whose line names the file, the table and the field, and what is wrong."""
    problems = problems_of(write_config(tmp_path, issuers, publishers, **gateway))
    assert len(problems) == 1, problems
    assert problems[0].startswith(where), problems
    assert fragment in problems[0], problems


VALID_GATEWAY = '[gateway]\naudience = "pypi"\nurl = "https://gateway.example"\n'
VALID_ISSUER = '[issuers.gitlab-com]\nurl = "https://gitlab.com"\nkind = "gitlab"\n'


@pytest.mark.parametrize(
    ("issuers_toml", "publishers_toml", "expected"),
    [
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER + "[extra]\nx = 1\n",
            "",
            "issuers.toml: [extra]: unknown table",
            id="unknown-top-level-table",
        ),
        pytest.param(VALID_ISSUER, "", "issuers.toml: [gateway]: table is missing", id="missing-gateway"),
        pytest.param(VALID_GATEWAY, "", "issuers.toml: [issuers]: table is missing", id="missing-issuers"),
        pytest.param(VALID_GATEWAY + "[issuers]\n", "", "issuers.toml: [issuers]: table is missing", id="no-issuers"),
        pytest.param(
            VALID_GATEWAY + "[issuers]\ngitlab-com = 1\n",
            "",
            "issuers.toml: [issuers.gitlab-com]: must be a table",
            id="issuer-not-a-table",
        ),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER.replace("gitlab-com", '"gitlab com"'),
            "",
            "issuers.toml: [issuers.gitlab com]: name must be",
            id="issuer-name-with-space",
        ),
        pytest.param("[gateway\n", "", "issuers.toml: file: is not valid TOML", id="invalid-toml"),
        pytest.param(VALID_GATEWAY + VALID_ISSUER, None, "publishers.toml: file: not found", id="missing-publishers"),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER,
            "[[publisher]\n",
            "publishers.toml: file: is not valid TOML",
            id="invalid-publishers-toml",
        ),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER,
            "[publishers]\nx = 1\n",
            "publishers.toml: [publishers]: unknown table",
            id="publishers-unknown-table",
        ),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER,
            'publisher = "x"\n',
            "publishers.toml: publisher: must be an array of tables",
            id="publisher-not-array",
        ),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER,
            "publisher = [1]\n",
            "publishers.toml: [[publisher]] #1: must be a table",
            id="publisher-entry-a-number",
        ),
        pytest.param(
            VALID_GATEWAY + VALID_ISSUER,
            "publisher = [[]]\n",
            "publishers.toml: [[publisher]] #1: must be a table",
            id="publisher-entry-an-array",
        ),
    ],
)
def test_structural_load_error_names_file_and_table(
    tmp_path: Path, issuers_toml: str, publishers_toml: str | None, expected: str
) -> None:
    """A missing, unknown or unparsable table or file is one load error naming the file and the table."""
    path = tmp_path / "issuers.toml"
    path.write_text(issuers_toml)
    if publishers_toml is not None:
        (tmp_path / "publishers.toml").write_text(publishers_toml)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        pytest.param(field, value, f"(got {value})", id=f"{field}-{value}")
        for field in ("fetch_timeout", "reload_interval", "drain_seconds")
        for value in (math.nan, math.inf)
    ]
    + [
        pytest.param("token_ttl", MAX_LIFETIME + 1, f"between 60 and {MAX_LIFETIME}", id="token-ttl-over-a-year"),
        pytest.param("leeway", MAX_LEEWAY + 1, f"between 0 and {MAX_LEEWAY}", id="leeway-over-max-leeway"),
    ],
)
def test_out_of_range_number_is_a_load_error_naming_the_field(
    tmp_path: Path, field: str, value: float, fragment: str
) -> None:
    """nan, inf (valid TOML floats) and numbers past a field's upper bound are load errors naming the field."""
    problems = problems_of(write_config(tmp_path, ISSUERS, [], **{field: value}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"issuers.toml: [gateway] {field}:"), problems
    assert fragment in problems[0], problems


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_upstream_timeout_is_a_load_error(tmp_path: Path, value: str) -> None:
    """An [upstream] timeout of nan or infinity is a load error naming the field."""
    path = write_config(tmp_path, ISSUERS, [])
    upstream = (
        f'[upstream]\nurl = "https://pypi.example/legacy/"\nusername = "op"\npassword_env = "PW"\ntimeout = {value}\n'
    )
    path.write_text(path.read_text() + "\n" + upstream)
    problems = problems_of(path, {"PW": "secret"})
    assert len(problems) == 1, problems
    assert problems[0].startswith("issuers.toml: [upstream] timeout:"), problems
    assert f"(got {value})" in problems[0], problems


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    """A config path that does not exist is a load error saying where it looked."""
    problems = problems_of(tmp_path / "nowhere.toml")
    assert problems == (f"nowhere.toml: file: not found at {tmp_path / 'nowhere.toml'}",)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        pytest.param(lambda: RSAKey.generate_key(2048).as_dict(private=True), "EC P-256", id="rsa"),
        pytest.param(lambda: ECKey.generate_key("P-384").as_dict(private=True), "EC P-256", id="p384"),
        pytest.param(lambda: generate_key().as_dict(private=False), "must be a private key", id="public-only"),
        pytest.param(lambda: {"kty": "EC", "crv": "P-256"}, "is not a JWK", id="malformed"),
    ],
)
def test_unusable_signing_key_is_reported(tmp_path: Path, key: Any, fragment: str) -> None:
    """A signing_key that is not a private P-256 or Ed25519 JWK is a load error on [gateway] signing_key."""
    (tmp_path / "key.json").write_text(json.dumps(key()))
    problems = problems_of(write_config(tmp_path, ISSUERS, signing_key="key.json"))
    assert len(problems) == 1, problems
    assert problems[0].startswith("issuers.toml: [gateway] signing_key:"), problems
    assert fragment in problems[0], problems


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    """Problems in both files are all reported in one ConfigError, each on its own line."""
    problems = problems_of(
        write_config(
            tmp_path,
            {"gitlab-com": GITLAB_COM, "cern": {"url": "http://gitlab.cern.ch", "kind": "gitlab"}},
            [PUBLISHER | {"issuer": "nowhere"}, PUBLISHER | {"owner_id": 1}],
            colour="blue",
            token_ttl=True,
        )
    )
    assert [line.partition(": ")[2].partition(":")[0] for line in problems] == [
        "[gateway] token_ttl",
        "[gateway] colour",
        "[issuers.cern] url",
        "[[publisher]] #1 issuer",
        "[[publisher]] #2 owner_id",
    ]
    assert str(ConfigError(problems)).splitlines() == list(problems)


@pytest.mark.parametrize(
    ("issuers", "publishers", "gateway", "line"),
    [
        pytest.param(
            ISSUERS, [], {"token_tll": 600},
            "issuers.toml: [gateway] token_tll: unknown key (did you mean 'token_ttl'?)",
            id="gateway-key",
        ),
        pytest.param(
            {"gitlab-com": GITLAB_COM | {"namespace": ["atlas"]}}, [], {},
            "issuers.toml: [issuers.gitlab-com] namespace: unknown key (did you mean 'namespaces'?)",
            id="issuer-key",
        ),
        pytest.param(
            ISSUERS, [PUBLISHER | {"enviroment": "release"}], {},
            "publishers.toml: [[publisher]] #1 enviroment: unknown key (did you mean 'environment'?)",
            id="publisher-key",
        ),
        pytest.param(
            ISSUERS, [PUBLISHER | {"issuer": "gitlab-cmo"}], {},
            "publishers.toml: [[publisher]] #1 issuer: names no issuer in [issuers] (got 'gitlab-cmo') "
            "(did you mean 'gitlab-com'?)",
            id="issuer-name",
        ),
        pytest.param(
            ISSUERS, [PUBLISHER | {"issuer": "github"}], {},
            "publishers.toml: [[publisher]] #1 issuer: names no issuer in [issuers] (got 'github')",
            id="nothing-near",
        ),
    ],
)  # fmt: skip
def test_unknown_names_suggest_the_nearest_known_one(
    tmp_path: Path,
    issuers: dict[str, dict[str, Any]],
    publishers: list[dict[str, Any]],
    gateway: dict[str, Any],
    line: str,
) -> None:
    """A misspelt key or issuer name is refused with the nearest known name suggested, and nothing when none is near."""
    assert problems_of(write_config(tmp_path, issuers, publishers, **gateway)) == (line,)


def test_unknown_table_suggests_the_nearest_known_one(tmp_path: Path) -> None:
    """A misspelt table name ([gatway]) is refused with the known table it is nearest to."""
    path = write_config(tmp_path, ISSUERS, [])
    path.write_text(path.read_text() + '\n[upstraem]\nurl = "https://index.test/legacy/"\n')
    assert problems_of(path) == ("issuers.toml: [upstraem]: unknown table (did you mean 'upstream'?)",)


def test_redis_prefix_defaults_to_gateway_and_takes_a_plain_name(tmp_path: Path) -> None:
    """redis_prefix is "gateway:" unless set, and a plain name like "staging:" is taken as written."""
    assert load(write_config(tmp_path, ISSUERS, [])).redis_prefix == "gateway:"
    assert load(write_config(tmp_path, ISSUERS, [], redis_prefix="staging:")).redis_prefix == "staging:"


@pytest.mark.parametrize(
    "prefix", ["", " ", "gate way:", "gateway:*", "gw[1]:", "?", ":leading", "x" * 65, "é:"], ids=repr
)
def test_redis_prefix_that_is_not_a_plain_name_is_a_load_error(tmp_path: Path, prefix: str) -> None:
    """A redis_prefix that is empty, too long, or holds spaces or glob characters (it goes into ACL and SCAN
    patterns) is one load error naming the field."""
    (problem,) = problems_of(write_config(tmp_path, ISSUERS, [], redis_prefix=prefix))
    assert problem.startswith("issuers.toml: [gateway] redis_prefix:"), problem


def test_ca_bundle_content_is_read_at_load(tmp_path: Path, ca: Any) -> None:
    """An issuer's ca_bundle is read when the config loads: its content is what the issuer trusts and is named by."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.cert_pem.bytes())
    settings = load(write_config(tmp_path, {"cern": GITLAB_COM | {"ca_bundle": str(bundle)}}, []))
    assert settings.issuers["cern"].ca_pem == ca.cert_pem.bytes()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ids=["empty", "text", "broken-block"],
)
def test_ca_bundle_openssl_cannot_load_is_a_load_error(tmp_path: Path, content: bytes) -> None:
    """A ca_bundle without a certificate OpenSSL can load is one load error naming the field (not a crash later)."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(content)
    (problem,) = problems_of(write_config(tmp_path, {"cern": GITLAB_COM | {"ca_bundle": str(bundle)}}, []))
    assert problem.startswith("issuers.toml: [issuers.cern] ca_bundle:"), problem
    assert "is not a readable PEM certificate file" in problem
