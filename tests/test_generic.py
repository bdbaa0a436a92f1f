"""The generic kind: claim mappings, templates and conditions from issuers.toml, and the shipped examples.

The examples are read from examples/ as an operator would paste them, with only the issuer url pointed at a real
HTTPS test issuer; tokens are real signed tokens with the claim sets the providers document, minted over HTTP.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import rtoml
import trustme
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway import config
from gateway.app import create_app
from gateway.errors import ConfigError
from gateway.issuers import KINDS
from gateway.issuers.generic import GENERIC
from gateway.testing import DELETE, FakeClock, TestIssuer
from tests.conftest import Gateway, description, error_code

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REGISTERED = {"iss", "sub", "aud", "exp", "nbf", "iat", "jti"}

BK_ORG_ID = "0184990a-477b-4fa8-9968-496074483a77"
BK_PIPELINE_ID = "0184990a-4782-42b5-afc1-16715b10b1a0"
CIRCLE_ORG = "c9035eb6-6eb2-4c85-8a81-d9ed6a1d1d1e"
CIRCLE_PROJECT = "3a2f5b1c-7d4e-4f6a-9b8c-0d1e2f3a4b5c"
CIRCLE_DEFINITION = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CIRCLE_PIPELINE = "9f8e7d6c-5b4a-4c3d-8e2f-1a0b9c8d7e6f"
COMMIT = "9f3182061f1e2cca4702c368cbc039b7dc9d4485"
FORGEJO_SHA = "76cb2978acb72029ac23277a6192eea1707c6a2c"


# --- realistic claim sets, as each provider documents its tokens --------------------------------------------------


def merge(claims: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(claims)
    for name, value in overrides.items():
        if value is DELETE:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def buildkite_claims(iss: str, now: int, **overrides: Any) -> dict[str, Any]:
    """A Buildkite job token with `--claim organization_id,pipeline_id` (shape of rubygems.org#5412's sample)."""
    claims = {
        "iss": iss,
        "sub": f"organization:acme-inc:pipeline:super-duper-app:ref:refs/heads/main:commit:{COMMIT}:step:publish",
        "aud": "pypi",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "organization_slug": "acme-inc",
        "pipeline_slug": "super-duper-app",
        "build_number": 5,
        "build_branch": "main",
        "build_tag": None,
        "build_commit": COMMIT,
        "step_key": "publish",
        "job_id": "01945ecf-80f0-41e8-9b83-a2970a9305a1",
        "agent_id": "01945ecf-8bcf-40a6-9d70-a765db9a0928",
        "build_source": "webhook",
        "runner_environment": "buildkite-hosted",
        "organization_id": BK_ORG_ID,
        "pipeline_id": BK_PIPELINE_ID,
    }
    return merge(claims, overrides)


def circleci_claims(iss: str, now: int, **overrides: Any) -> dict[str, Any]:
    """A `circleci run oidc get --claims '{"aud": "pypi"}'` token: no jti and no nbf, as CircleCI sends them."""
    claims = {
        "iss": iss,
        "sub": f"org/{CIRCLE_ORG}/project/{CIRCLE_PROJECT}/user/5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
        "aud": "pypi",
        "iat": now,
        "exp": now + 3600,
        "oidc.circleci.com/context-ids": ["7b6a5c4d-3e2f-4a1b-8c9d-0e1f2a3b4c5d"],
        "oidc.circleci.com/job-id": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9",
        "oidc.circleci.com/org-id": CIRCLE_ORG,
        "oidc.circleci.com/pipeline-definition-id": CIRCLE_DEFINITION,
        "oidc.circleci.com/pipeline-id": CIRCLE_PIPELINE,
        "oidc.circleci.com/project-id": CIRCLE_PROJECT,
        "oidc.circleci.com/ssh-rerun": False,
        "oidc.circleci.com/vcs-origin": "github.com/octo/widgets",
        "oidc.circleci.com/vcs-ref": "refs/heads/main",
        "oidc.circleci.com/vcs-sha": FORGEJO_SHA,
        "oidc.circleci.com/workflow-id": "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
    }
    return merge(claims, overrides)


def forgejo_claims(iss: str, now: int, **overrides: Any) -> dict[str, Any]:
    """A Forgejo Actions token for a protected tag push (the documented token's claims): no jti."""
    claims = {
        "actor": "user1",
        "aud": "pypi",
        "event_name": "push",
        "exp": now + 3600,
        "iat": now,
        "iss": iss,
        "nbf": now,
        "ref": "refs/tags/v1.2.0",
        "ref_protected": "true",
        "ref_type": "tag",
        "repository": "user1/testing",
        "repository_owner": "user1",
        "run_attempt": "1",
        "run_id": "43",
        "run_number": "43",
        "sha": FORGEJO_SHA,
        "sub": "repo:user1/testing:ref:refs/tags/v1.2.0",
        "workflow": "release.yml",
        "workflow_ref": "user1/testing/.forgejo/workflows/release.yml@refs/tags/v1.2.0",
    }
    return merge(claims, overrides)


@dataclass(frozen=True)
class Example:
    file: str
    issuer_fixture: str
    claims: Callable[..., dict[str, Any]]
    publisher: dict[str, Any]
    identity: dict[str, Any]
    sends_jti: bool


EXAMPLE_SET = {
    "buildkite": Example(
        file="buildkite.toml",
        issuer_fixture="issuer",
        claims=buildkite_claims,
        publisher={
            "repository": "acme-inc/super-duper-app",
            "workflow": "publish",
            "owner_id": BK_ORG_ID,
            "projects": ["super-duper-app"],
        },
        identity={
            "kind": "generic",
            "repository": "acme-inc/super-duper-app",
            "repository_id": BK_PIPELINE_ID,
            "owner": "acme-inc",
            "owner_id": BK_ORG_ID,
            "workflow": "publish",
            "ref": "main",
            "ref_path": None,
            "ref_type": None,
            "sha": COMMIT,
            "environment": None,
            "trigger": "webhook",
            "run_id": "5",
            "actor": None,
            "runner_environment": "buildkite-hosted",
            "visibility": None,
            "protected_ref": None,
        },
        sends_jti=True,
    ),
    "circleci": Example(
        file="circleci.toml",
        issuer_fixture="circleci_issuer",
        claims=circleci_claims,
        publisher={
            "repository": "github.com/octo/widgets",
            "workflow": CIRCLE_DEFINITION,
            "owner_id": CIRCLE_ORG,
            "projects": ["widgets"],
        },
        identity={
            "kind": "generic",
            "repository": "github.com/octo/widgets",
            "repository_id": CIRCLE_PROJECT,
            "owner": None,
            "owner_id": CIRCLE_ORG,
            "workflow": CIRCLE_DEFINITION,
            "ref": "refs/heads/main",
            "ref_path": None,
            "ref_type": None,
            "sha": None,
            "environment": None,
            "trigger": None,
            "run_id": CIRCLE_PIPELINE,
            "actor": None,
            "runner_environment": None,
            "visibility": None,
            "protected_ref": None,
        },
        sends_jti=False,
    ),
    "forgejo": Example(
        file="forgejo.toml",
        issuer_fixture="forgejo_issuer",
        claims=forgejo_claims,
        publisher={"repository": "user1/testing", "workflow": "release.yml", "projects": ["testing"]},
        identity={
            "kind": "generic",
            "repository": "user1/testing",
            "repository_id": None,
            "owner": "user1",
            "owner_id": None,
            "workflow": "release.yml",
            "ref": "refs/tags/v1.2.0",
            "ref_path": None,
            "ref_type": "tag",
            "sha": FORGEJO_SHA,
            "environment": None,
            "trigger": "push",
            "run_id": "43",
            "actor": "user1",
            "runner_environment": None,
            "visibility": None,
            "protected_ref": True,
        },
        sends_jti=False,
    ),
}
EXAMPLE_NAMES = list(EXAMPLE_SET)


# --- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def circleci_issuer(ca: trustme.CA) -> Iterator[TestIssuer]:
    """A test issuer at CircleCI's per-organization issuer path."""
    with TestIssuer(path=f"/org/{CIRCLE_ORG}", ca=ca) as test_issuer:
        yield test_issuer


@pytest.fixture(scope="module")
def forgejo_issuer(ca: trustme.CA) -> Iterator[TestIssuer]:
    """A test issuer at a Forgejo instance's issuer path."""
    with TestIssuer(path="/api/actions", ca=ca) as test_issuer:
        yield test_issuer


def example_table(file: str) -> tuple[str, dict[str, Any]]:
    """The one issuer table of an example file, parsed from the file as shipped."""
    document = rtoml.loads((EXAMPLES / file).read_text("utf-8"))
    assert set(document) == {"issuers"}
    [(name, table)] = document["issuers"].items()
    return name, table


def pointed_at(table: Mapping[str, Any], test_issuer: TestIssuer, **keys: Any) -> dict[str, Any]:
    """An example's issuer table with its url pointed at the test issuer (and `keys` changed)."""
    return copy.deepcopy(dict(table)) | {"url": test_issuer.url, "ca_bundle": str(test_issuer.ca_path)} | keys


def write(directory: Path, issuers: Mapping[str, Any], publishers: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write issuers.toml (nested claims and conditions tables included) and publishers.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    gateway = {"audience": "pypi", "url": "https://gateway.test", "publishers": "publishers.toml"}
    path = directory / "issuers.toml"
    path.write_text(rtoml.dumps({"gateway": gateway, "issuers": issuers}))
    (directory / "publishers.toml").write_text(rtoml.dumps({"publisher": list(publishers)}))
    return path


def problems(tmp_path: Path, issuers: Mapping[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        config.load(write(tmp_path / "config", issuers))
    return raised.value.problems


@pytest.fixture
async def make(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., Any]]:
    """Build a gateway over HTTP from issuer tables (which may nest claims/conditions) and publishers."""
    made: list[Gateway] = []

    async def build(issuers: Mapping[str, Any], publishers: Sequence[Mapping[str, Any]]) -> Gateway:
        settings = config.load(write(tmp_path / f"gateway-{len(made)}", issuers, publishers))
        app = create_app(settings, clock=clock)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway.test")
        made.append(Gateway(app, client))
        return made[-1]

    yield build
    for gateway in made:
        await gateway.client.aclose()
        await gateway.exchange.keys.aclose()
        await gateway.exchange.store.aclose()


@dataclass
class Setup:
    gateway: Gateway
    issuer: TestIssuer
    name: str
    now: int
    example: Example

    def token(self, **overrides: Any) -> str:
        return self.issuer.sign(self.example.claims(self.issuer.url, self.now, **overrides))


async def setup(
    request: pytest.FixtureRequest,
    make: Callable[..., Any],
    clock: FakeClock,
    example: str,
    *,
    publishers: Sequence[Mapping[str, Any]] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **keys: Any,
) -> Setup:
    """A gateway trusting one example issuer, pointed at its test issuer, with the example's publisher."""
    spec = EXAMPLE_SET[example]
    test_issuer: TestIssuer = request.getfixturevalue(spec.issuer_fixture)
    name, table = example_table(spec.file)
    table = pointed_at(table, test_issuer, **keys)
    if edit is not None:
        edit(table)
    if publishers is None:
        publishers = [spec.publisher | {"issuer": name}]
    gateway = await make({name: table}, publishers)
    return Setup(gateway=gateway, issuer=test_issuer, name=name, now=int(clock()), example=spec)


def assert_refused(response: httpx.Response, token: str, code: str, *fragments: str) -> None:
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    text = description(response)
    for fragment in fragments:
        assert fragment in text, text
    assert token not in text


async def minted_identity(gateway: Gateway, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    jwks = (await gateway.client.get("/.well-known/jwks.json")).json()
    decoded = jwt.decode(response.json()["token"], KeySet.import_key_set(jwks), algorithms=["ES256"])
    return decoded.claims["identity"]  # type: ignore[no-any-return]


# --- the shipped examples ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_example_file_loads_as_shipped(tmp_path: Path, example: str) -> None:
    """Each example file, pasted unchanged under a [gateway] table, is a valid generic issuers.toml."""
    text = '[gateway]\naudience = "pypi"\nurl = "https://gateway.test"\n\n' + (EXAMPLES / f"{example}.toml").read_text()
    (tmp_path / "issuers.toml").write_text(text)
    (tmp_path / "publishers.toml").write_text("")
    settings = config.load(tmp_path / "issuers.toml")
    [issuer] = settings.issuers.values()
    assert issuer.kind == "generic"
    assert issuer.url.startswith("https://") and "127.0.0.1" not in issuer.url
    assert {mapping.field for mapping in issuer.options.mappings} >= {"repository", "workflow"}


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_example_mints_end_to_end(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, example: str
) -> None:
    """A realistic token for each example mints, and the minted identity is the example's mapping of its claims."""
    s = await setup(request, make, clock, example)
    # CircleCI and Forgejo send no jti (see the next test); the mapping itself is what this test checks.
    extra = {} if s.example.sends_jti else {"jti": str(uuid.uuid4())}
    response = await s.gateway.mint(s.token(**extra))
    identity = await minted_identity(s.gateway, response)
    assert identity == s.example.identity | {"issuer": s.name, "issuer_url": s.issuer.url}
    assert response.json()["projects"] == s.example.publisher["projects"]


@pytest.mark.parametrize("example", [name for name, spec in EXAMPLE_SET.items() if not spec.sends_jti])
async def test_examples_without_jti_are_refused_as_the_providers_send_them(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, example: str
) -> None:
    """CircleCI's and Forgejo's tokens carry no jti, so the gateway (contract 5.6) refuses them as they are sent."""
    s = await setup(request, make, clock, example)
    token = s.token()
    assert_refused(await s.gateway.mint(token), token, "invalid-token", "jti")


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_every_realistic_claim_is_mapped_or_deliberately_ignored(tmp_path: Path, example: str) -> None:
    """Each claim of an example's realistic token is mapped, a condition, registered or in its ignored_claims."""
    spec = EXAMPLE_SET[example]
    _, table = example_table(spec.file)
    settings = config.load(write(tmp_path, {"x": table}))
    known = KINDS["generic"].known_claims(settings.issuers["x"])
    claims = spec.claims("https://issuer.test", 1_700_000_000)
    assert set(claims) - known == set()
    # And known_claims is no catch-all: it is exactly what the example names.
    named = set(table["claims"].values()) | set(table.get("conditions", {})) | set(table["ignored_claims"])
    templated = {"organization_slug", "pipeline_slug"} if example == "buildkite" else set()
    assert known == REGISTERED | {n for n in named if "{" not in n} | templated


# --- mapping: missing, null and non-scalar claims ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "claim", "field"),
    [
        pytest.param({"step_key": DELETE}, "step_key", "workflow", id="absent"),
        pytest.param({"step_key": None}, "step_key", "workflow", id="null-step-key"),
        pytest.param({"organization_id": DELETE}, "organization_id", "owner_id", id="optional-claim-not-requested"),
        pytest.param({"pipeline_slug": DELETE}, "pipeline_slug", "repository", id="absent-from-template"),
    ],
)
async def test_missing_mapped_claim_is_invalid_token_naming_claim_and_field(
    request: pytest.FixtureRequest,
    make: Any,
    clock: FakeClock,
    overrides: dict[str, Any],
    claim: str,
    field: str,
) -> None:
    """A mapped claim that is absent or null refuses the token as invalid-token, naming the claim and the field."""
    s = await setup(request, make, clock, "buildkite")
    token = s.token(**overrides)
    assert_refused(await s.gateway.mint(token), token, "invalid-token", repr(claim), field)


@pytest.mark.parametrize(
    ("value", "what"),
    [
        pytest.param(["acme-inc"], "a list", id="list"),
        pytest.param({"slug": "acme-inc"}, "an object", id="object"),
        pytest.param(True, "a boolean", id="boolean"),
        pytest.param(1.5, "a number", id="float"),
        pytest.param("", "an empty string", id="empty"),
        pytest.param(2**60, "a number", id="integer-beyond-json-precision"),
    ],
)
async def test_template_placeholder_with_non_string_claim_is_refused(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, value: Any, what: str
) -> None:
    """A template placeholder whose claim is not a non-empty string or a safe integer is invalid-token."""
    s = await setup(request, make, clock, "buildkite")
    token = s.token(organization_slug=value)
    assert_refused(
        await s.gateway.mint(token), token, "invalid-token", "'organization_slug'", what, "repository", "string"
    )


async def test_integer_claim_is_rendered_in_decimal(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """An integer claim (Buildkite's build_number) maps to its decimal string."""
    s = await setup(request, make, clock, "buildkite")
    identity = await minted_identity(s.gateway, await s.gateway.mint(s.token(build_number=1234567)))
    assert identity["run_id"] == "1234567"


async def test_template_placeholders_are_literal_claim_names_not_python_format(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """`{a.__class__}` and `{a[0]}` name claims literally: no attribute or index access, as str.format would do."""

    def edit(table: dict[str, Any]) -> None:
        table["claims"]["repository"] = "{organization_slug.__class__}/{pipeline_slug[0]}"

    s = await setup(request, make, clock, "buildkite", edit=edit)
    token = s.token()
    assert_refused(await s.gateway.mint(token), token, "invalid-token", "'organization_slug.__class__'")
    # With claims of exactly those names, the template renders their values.
    publisher = EXAMPLE_SET["buildkite"].publisher | {"issuer": s.name, "repository": "acme-inc/app"}
    s = await setup(request, make, clock, "buildkite", edit=edit, publishers=[publisher])
    token = s.token(**{"organization_slug.__class__": "acme-inc", "pipeline_slug[0]": "app"})
    identity = await minted_identity(s.gateway, await s.gateway.mint(token))
    assert identity["repository"] == "acme-inc/app"


async def test_claim_values_are_not_expanded_as_templates(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """A claim value containing `{pipeline_slug}` stays literal text in the rendered field."""
    s = await setup(request, make, clock, "buildkite", namespaces=["acme-inc", "{pipeline_slug}"])
    token = s.token(organization_slug="{pipeline_slug}")
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "'{pipeline_slug}/super-duper-app'")


async def test_claim_names_with_slashes_and_dots_are_mapped(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """Namespaced claims like `oidc.circleci.com/vcs-origin` work as plain names and inside templates."""

    def edit(table: dict[str, Any]) -> None:
        table["claims"]["repository"] = "{oidc.circleci.com/vcs-origin}"
        table["claims"]["workflow"] = "{oidc.circleci.com/project-id}:{oidc.circleci.com/pipeline-definition-id}"

    publisher = EXAMPLE_SET["circleci"].publisher | {"workflow": f"{CIRCLE_PROJECT}:{CIRCLE_DEFINITION}"}
    s = await setup(request, make, clock, "circleci", edit=edit, publishers=[publisher | {"issuer": "circleci-octo"}])
    identity = await minted_identity(s.gateway, await s.gateway.mint(s.token(jti=str(uuid.uuid4()))))
    assert identity["repository"] == "github.com/octo/widgets"
    assert identity["workflow"] == f"{CIRCLE_PROJECT}:{CIRCLE_DEFINITION}"


# --- protected_ref -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("true", True, id="string-true"),
        pytest.param("false", False, id="string-false"),
        pytest.param(True, True, id="json-true"),
        pytest.param(False, False, id="json-false"),
    ],
)
async def test_protected_ref_mapping_turns_true_and_false_into_a_bool(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, value: Any, expected: bool
) -> None:
    """The protected_ref mapping accepts true/false and "true"/"false" and yields a boolean identity field."""
    s = await setup(request, make, clock, "forgejo", require_protected_ref=False)
    token = s.token(ref_protected=value, jti=str(uuid.uuid4()))
    identity = await minted_identity(s.gateway, await s.gateway.mint(token))
    assert identity["protected_ref"] is expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("yes", id="yes"),
        pytest.param("TRUE", id="upper-case"),
        pytest.param(1, id="number-one"),
        pytest.param(["true"], id="list"),
    ],
)
async def test_protected_ref_mapping_refuses_anything_else(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, value: Any
) -> None:
    """A protected_ref claim that is not true/false or "true"/"false" is invalid-token, naming the claim."""
    s = await setup(request, make, clock, "forgejo", require_protected_ref=False)
    token = s.token(ref_protected=value, jti=str(uuid.uuid4()))
    assert_refused(await s.gateway.mint(token), token, "invalid-token", "'ref_protected'", "protected_ref")


# --- conditions ----------------------------------------------------------------------------------------------------


def more_conditions(table: dict[str, Any]) -> None:
    table["conditions"] |= {"queue_ok": True, "tier": 2}


@pytest.mark.parametrize(
    ("overrides", "claim", "expected", "actual"),
    [
        pytest.param({"build_source": "ui"}, "build_source", '"webhook"', '"ui"', id="other-string"),
        pytest.param({}, "queue_ok", "true", "no 'queue_ok' claim", id="absent"),
        pytest.param({"queue_ok": "true"}, "queue_ok", "true", '"true"', id="string-for-boolean"),
        pytest.param({"queue_ok": True, "tier": True}, "tier", "2", "true", id="boolean-for-integer"),
        pytest.param({"queue_ok": 1}, "queue_ok", "true", "1", id="one-for-true"),
        pytest.param({"queue_ok": True, "tier": 2.0}, "tier", "2", "2.0", id="float-for-integer"),
        pytest.param({"queue_ok": True, "tier": "2"}, "tier", "2", '"2"', id="string-for-integer"),
        pytest.param({"queue_ok": True, "tier": 3}, "tier", "2", "3", id="other-integer"),
    ],
)
async def test_condition_mismatch_is_invalid_publisher_naming_claim_expected_and_actual(
    request: pytest.FixtureRequest,
    make: Any,
    clock: FakeClock,
    overrides: dict[str, Any],
    claim: str,
    expected: str,
    actual: str,
) -> None:
    """A condition holds only for the exact value and JSON type; otherwise invalid-publisher says what differs."""
    s = await setup(request, make, clock, "buildkite", edit=more_conditions)
    token = s.token(**overrides)
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", f"claim {claim!r} is {expected}", actual)


async def test_all_conditions_holding_mints(request: pytest.FixtureRequest, make: Any, clock: FakeClock) -> None:
    """With every condition met (string, boolean and integer), the token mints."""
    s = await setup(request, make, clock, "buildkite", edit=more_conditions)
    response = await s.gateway.mint(s.token(queue_ok=True, tier=2))
    assert response.status_code == 200, response.text


async def test_ssh_rerun_is_refused_by_the_circleci_condition(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """The CircleCI example refuses a job re-run with SSH (a boolean condition)."""
    s = await setup(request, make, clock, "circleci")
    token = s.token(**{"oidc.circleci.com/ssh-rerun": True, "jti": str(uuid.uuid4())})
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "ssh-rerun", "false", "true")


# --- per-issuer policy and publisher matching apply to generic issuers -------------------------------------------


@pytest.mark.parametrize("organization", ["evil-inc", "acme-inc-evil", "ACME-INC-x"])
async def test_generic_token_outside_namespaces_is_refused(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock, organization: str
) -> None:
    """A generic issuer's `namespaces` refuse a repository rendered outside them, on a segment boundary."""
    s = await setup(request, make, clock, "buildkite")
    token = s.token(organization_slug=organization)
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "outside the namespaces")


async def test_suspended_generic_issuer_mints_nothing(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """`enabled = false` suspends a generic issuer like any other."""
    s = await setup(request, make, clock, "buildkite", enabled=False)
    token = s.token()
    assert_refused(await s.gateway.mint(token), token, "invalid-payload", "suspended")


async def test_runner_environments_apply_to_generic_issuers(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """`runner_environments` uses the mapped runner_environment: a self-hosted agent is refused."""
    s = await setup(request, make, clock, "buildkite", runner_environments=["buildkite-hosted"])
    token = s.token(runner_environment="self-hosted")
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "self-hosted")
    assert (await s.gateway.mint(s.token())).status_code == 200


async def test_require_protected_ref_uses_the_mapped_protected_ref(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """The Forgejo example's `require_protected_ref` refuses a run on an unprotected ref."""
    s = await setup(request, make, clock, "forgejo")
    token = s.token(ref_protected="false", jti=str(uuid.uuid4()))
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "not protected")


async def test_require_protected_ref_refuses_a_generic_issuer_that_maps_none(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """A generic issuer without a protected_ref mapping cannot satisfy `require_protected_ref`."""
    s = await setup(request, make, clock, "buildkite", require_protected_ref=True)
    token = s.token()
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "not protected")


async def test_publisher_fields_are_compared_for_generic_identities(
    request: pytest.FixtureRequest, make: Any, clock: FakeClock
) -> None:
    """A generic identity with another workflow or owner_id than the publisher's is invalid-publisher."""
    s = await setup(request, make, clock, "buildkite")
    token = s.token(step_key="test")
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "workflow expected 'publish'")
    token = s.token(organization_id="0184990a-0000-4000-8000-000000000000")
    assert_refused(await s.gateway.mint(token), token, "invalid-publisher", "owner_id expected")


# --- load-time validation ------------------------------------------------------------------------------------------


def claims_set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        table["claims"][field] = value

    return edit


def claims_drop(field: str) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        del table["claims"][field]

    return edit


def condition_set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        table["conditions"][name] = value

    return edit


def key_set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        table[key] = value

    return edit


def key_drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        del table[key]

    return edit


CLAIMS = "issuers.toml: [issuers.buildkite.claims]"
CONDITIONS = "issuers.toml: [issuers.buildkite.conditions]"
ISSUER = "issuers.toml: [issuers.buildkite]"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(claims_set("repo", "pipeline_slug"), f"{CLAIMS} repo: is not an identity field", id="unknown"),
        pytest.param(claims_set("kind", "pipeline_slug"), f"{CLAIMS} kind: is set by the gateway", id="gateway-field"),
        pytest.param(claims_set("workflow", ""), f"{CLAIMS} workflow: must not be empty", id="empty-template"),
        pytest.param(claims_set("workflow", "{}"), f"{CLAIMS} workflow: template '{{}}' has an empty", id="empty-{}"),
        pytest.param(claims_set("ref", "{build_branch"), f"{CLAIMS} ref: has an unmatched", id="unclosed"),
        pytest.param(claims_set("ref", "build_branch}"), f"{CLAIMS} ref: has an unmatched", id="unopened"),
        pytest.param(claims_set("ref", "{a{b}}"), f"{CLAIMS} ref: has an unmatched", id="nested"),
        pytest.param(claims_set("ref", "{ build_branch }"), f"{CLAIMS} ref: template", id="space-in-placeholder"),
        pytest.param(claims_set("ref", "build branch"), f"{CLAIMS} ref: 'build branch' is not a claim", id="space"),
        pytest.param(claims_set("ref", 5), f"{CLAIMS} ref: must be a claim name or a template string", id="int"),
        pytest.param(claims_set("ref", ["a"]), f"{CLAIMS} ref: must be a claim name or a template", id="list"),
        pytest.param(claims_drop("repository"), f"{CLAIMS} repository: is required", id="no-repository"),
        pytest.param(claims_drop("workflow"), f"{CLAIMS} workflow: is required", id="no-workflow"),
        pytest.param(
            claims_set("protected_ref", "{a}{b}"), f"{CLAIMS} protected_ref: must name one claim", id="bool-template"
        ),
        pytest.param(condition_set("tier", 1.5), f"{CONDITIONS} tier: must be a string, true/false", id="cond-float"),
        pytest.param(condition_set("tier", [1]), f"{CONDITIONS} tier: must be a string", id="cond-list"),
        pytest.param(condition_set("tier", {"a": 1}), f"{CONDITIONS} tier: must be a string", id="cond-table"),
        pytest.param(condition_set("a b", "x"), f"{CONDITIONS} 'a b': is not a claim name", id="cond-name"),
        pytest.param(key_set("conditions", "x"), f"{ISSUER} conditions: must be", id="conditions-not-table"),
        pytest.param(key_set("ignored_claims", [1]), f"{ISSUER} ignored_claims: must be a list", id="ignored-type"),
        pytest.param(
            key_set("ignored_claims", ["job_id", "step_key"]),
            f"{ISSUER} ignored_claims: 'step_key' is used",
            id="ignored-but-mapped",
        ),
        pytest.param(
            key_set("ignored_claims", ["build_source"]),
            f"{ISSUER} ignored_claims: 'build_source' is used",
            id="ignored-but-condition",
        ),
        pytest.param(key_drop("claims"), f"{ISSUER} claims: is required", id="no-claims"),
        pytest.param(key_set("claims", "repository"), f"{ISSUER} claims: must be", id="claims-not-table"),
    ],
)
def test_bad_generic_config_is_refused_naming_file_table_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """Each mistake in a generic issuer's tables is a load problem naming the file, the table and the field."""
    _, table = example_table("buildkite.toml")
    edit(table)
    found = problems(tmp_path, {"buildkite": table})
    assert any(line.startswith(expected) for line in found), found


def test_every_generic_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes in one generic issuer are all reported in one load."""
    _, table = example_table("buildkite.toml")
    table["claims"] |= {"repo": "x", "ref": "{build_branch"}
    del table["claims"]["workflow"]
    table["conditions"]["tier"] = 1.5
    found = problems(tmp_path, {"buildkite": table})
    for expected in (f"{CLAIMS} repo:", f"{CLAIMS} ref:", f"{CLAIMS} workflow:", f"{CONDITIONS} tier:"):
        assert any(line.startswith(expected) for line in found), (expected, found)


@pytest.mark.parametrize("key", ["claims", "conditions", "ignored_claims"])
def test_generic_keys_on_another_kind_are_unknown(tmp_path: Path, issuer: TestIssuer, key: str) -> None:
    """`claims`, `conditions` and `ignored_claims` mean nothing to a gitlab issuer, so they are flagged."""
    _, table = example_table("buildkite.toml")
    gitlab = {"url": issuer.url, "kind": "gitlab", key: table[key]}
    found = problems(tmp_path, {"gitlab-com": gitlab})
    assert f"issuers.toml: [issuers.gitlab-com] {key}: unknown key" in found


def test_known_claims_are_mapped_conditions_ignored_and_registered(tmp_path: Path) -> None:
    """known_claims lists exactly the claims the mapping and conditions use, the ignored ones, and the registered."""
    settings = config.load(
        write(
            tmp_path,
            {
                "ci": {
                    "url": "https://ci.example",
                    "kind": "generic",
                    "ignored_claims": ["noise"],
                    "claims": {"repository": "{org}/{oidc.ci.example/repo}", "workflow": "pipeline"},
                    "conditions": {"trusted": True},
                }
            },
        )
    )
    known = GENERIC.known_claims(settings.issuers["ci"])
    assert known == REGISTERED | {"org", "oidc.ci.example/repo", "pipeline", "trusted", "noise"}
