"""Settings: load -> parse -> validate, and the only module that reads files or the environment.

Every problem is collected (not just the first) and named by file, table and field, so an operator fixes a
config in one pass. A config with any problem is refused whole.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import rtoml
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OKPKey, import_key

from . import redisurl
from .errors import ConfigError
from .issuers import KINDS, DenyValue
from .issuers import Issuer as Issuer  # re-exported: the record lives with the kinds, which must not import config
from .jose import MAX_LIFETIME
from .keys.fetch import FetchError, parse_jwks
from .publishers import Publisher, normalize_project, ref_pattern_problem, under_namespaces
from .tables import Problems, Table, did_you_mean

DEFAULT_CONFIG = "issuers.toml"
# The largest `leeway` a config may set. Spent jtis are remembered until exp + MAX_LEEWAY (exchange.py), so no
# reload, whatever leeway it sets, can make a spent token acceptable again.
MAX_LEEWAY = 300

# Algorithms an issuer may list. Symmetric ones and `none` can never be listed: an HMAC "key" taken from a
# public JWKS is public, so anyone could sign with it. EdDSA is listed under RFC 9864's fully specified name.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "Ed25519"}
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*-----END CERTIFICATE-----")
_REDIS_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PROJECT = re.compile(r"[A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9]", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Upstream:
    """The index that uploads through `/legacy/` go to, and the operator's credentials for it."""

    url: str
    username: str
    password: str = field(repr=False)
    max_upload: int = 100 * 1024 * 1024
    timeout: float = 300.0
    # Where uploads are spooled past their first MiB; None: the system temporary directory.
    spool_dir: Path | None = None
    max_concurrent_uploads: int = 4
    allow_http: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    audience: str
    url: str
    issuers: Mapping[str, Issuer]
    publishers: tuple[Publisher, ...] = ()
    signing_key: Key | None = None
    previous_signing_keys: tuple[Key, ...] = ()
    token_ttl: int = 900
    leeway: int = 30
    redis_url: str | None = None
    redis_prefix: str = "gateway:"
    redis_replica_acks: int = 0
    redis_replica_ack_timeout: float = 0.5
    redis_sentinel_password: str | None = field(default=None, repr=False)
    replay_fallback: bool = False
    max_body: int = 16 * 1024
    fetch_timeout: float = 5.0
    fetch_max_bytes: int = 256 * 1024
    keys_ttl: int = 300
    refresh_cooldown: int = 60
    keys_max_age: int = 24 * 3600
    reload_interval: float = 5.0
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    rate_limit_client: str | None = None
    rate_limit_repository: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    drain_seconds: float = 0.0
    upstream: Upstream | None = None
    # Pins and revocations without Redis (gateway.state); None: in this process only.
    state_file: Path | None = None
    config_path: Path | None = field(default=None, compare=False)
    # Every file the settings were read from, for the reloader to watch.
    files: tuple[Path, ...] = field(default=(), compare=False)
    by_url: Mapping[str, Issuer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_url", {issuer.url: issuer for issuer in self.issuers.values()})


def config_path(cli_value: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    return Path(cli_value or environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)


def load(path: Path | str, environ: Mapping[str, str] = os.environ, *, uploads: bool = True) -> Settings:
    """The settings, or ConfigError. `uploads=False` is for commands that never upload (`explain`): the
    [upstream] password may then be unset, and such a config has no upstream."""
    # Absolute, so relative paths inside the config mean the same thing whatever the working directory later.
    path = Path(path).absolute()
    problems = Problems()
    raw = _read_toml(path, problems)
    if raw is None:
        raise ConfigError(problems.lines)
    settings = _validate(raw, path, environ, problems, uploads=uploads)
    if problems.lines or settings is None:
        raise ConfigError(problems.lines)
    return settings


def _read_toml(path: Path, problems: Problems) -> dict[str, Any] | None:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        problems.add(path, "file", f"not found at {path}")
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.add(path, "file", f"cannot be read: {getattr(e, 'strerror', None) or e}")
        return None
    try:
        # rtoml rather than tomllib: a publishers file of 100,000 entries parses in a fifth of the time.
        document: dict[str, Any] = rtoml.loads(text)
    except rtoml.TomlParsingError as e:
        problems.add(path, "file", f"is not valid TOML: {e}")
        return None
    return document


def _validate(
    raw: Mapping[str, Any], path: Path, environ: Mapping[str, str], problems: Problems, *, uploads: bool = True
) -> Settings | None:
    base = path.parent
    tables = {"gateway", "issuers", "upstream"}
    for key in sorted(set(raw) - tables):
        problems.add(path, f"[{key}]", "unknown table" + did_you_mean(key, tables))
    if not isinstance(raw.get("gateway"), dict):
        problems.add(path, "[gateway]", "table is missing")
        return None
    if not isinstance(raw.get("issuers"), dict) or not raw["issuers"]:
        problems.add(path, "[issuers]", "table is missing or has no issuers")
        return None

    t = Table(raw["gateway"], path, "[gateway]", problems)
    audience = t.string("audience", required=True)
    url = t.string("url", required=True)
    if url is not None and not is_base_url(url, schemes=("https", "http")):
        t.problem("url", f"must be an http(s) URL with no query or fragment (got {url!r})")
    publishers_file = t.string("publishers", "publishers.toml")
    signing_key_file = t.string("signing_key")
    previous_files = t.strings("previous_signing_keys") or ()
    # Upper bounds: the gateway's own verifier refuses tokens living over a year, and a leeway of minutes is
    # already generous for clock skew.
    token_ttl = t.number("token_ttl", 900, minimum=60, maximum=MAX_LIFETIME)
    leeway = t.number("leeway", 30, minimum=0, maximum=MAX_LEEWAY)
    redis_url = environ.get("GATEWAY_REDIS_URL") or t.string("redis_url")
    if "redis_url" in t.data and "GATEWAY_REDIS_URL" in environ:
        t.seen.add("redis_url")
    if redis_url is not None:
        try:
            redisurl.parse(redis_url)
        except ValueError as e:
            source = " (from $GATEWAY_REDIS_URL)" if environ.get("GATEWAY_REDIS_URL") else ""
            t.problem("redis_url", f"{e}{source}")
    # Replicas that must hold a spend before it counts (WAIT): what survives a failover of the primary.
    redis_replica_acks = t.number("redis_replica_acks", 0, minimum=0, maximum=100)
    # Above 0: WAIT with a timeout of 0 would block for ever.
    redis_replica_ack_timeout = t.number("redis_replica_ack_timeout", 0.5, minimum=0.001, maximum=60, integer=False)
    redis_sentinel_password = t.string("redis_sentinel_password")
    redis_sentinel_password = environ.get("GATEWAY_REDIS_SENTINEL_PASSWORD") or redis_sentinel_password
    redis_prefix = _redis_prefix(t)
    replay_fallback = t.get("replay_fallback", bool, False)
    max_body = t.number("max_body", 16 * 1024, minimum=1024)
    fetch_timeout = t.number("fetch_timeout", 5.0, minimum=0.1, integer=False)
    fetch_max_bytes = t.number("fetch_max_bytes", 256 * 1024, minimum=1024)
    keys_ttl = t.number("keys_ttl", 300, minimum=1)
    refresh_cooldown = t.number("refresh_cooldown", 60, minimum=1)
    keys_max_age = t.number("keys_max_age", 24 * 3600, minimum=1)
    reload_interval = t.number("reload_interval", 5.0, minimum=0, integer=False)
    trusted_proxies = _networks(t, "trusted_proxies")
    rate_limit_client = _rate(t, "rate_limit_client")
    rate_limit_repository = _rate(t, "rate_limit_repository")
    log_level = _choice(t, "log_level", ("debug", "info", "warning", "error"), "info")
    if environ.get("GATEWAY_LOG_LEVEL") in ("debug", "info", "warning", "error"):
        log_level = environ["GATEWAY_LOG_LEVEL"]
    log_format = _choice(t, "log_format", ("text", "json"), "text")
    drain_seconds = t.number("drain_seconds", 0.0, minimum=0, integer=False)
    state_file = t.string("state_file", "gateway-state.json") or "gateway-state.json"
    t.finish()

    issuers = _issuers(raw["issuers"], path, problems)
    upstream = _upstream(raw["upstream"], path, environ, problems, uploads=uploads) if "upstream" in raw else None

    signing_key = None
    if signing_key_file is not None:
        signing_key = _signing_key(base / signing_key_file, path, "[gateway] signing_key", problems)
    previous = tuple(
        key
        for key in (
            _signing_key(base / name, path, "[gateway] previous_signing_keys", problems, private=False)
            for name in previous_files
        )
        if key is not None
    )

    publishers: tuple[Publisher, ...] = ()
    if publishers_file is not None:
        publishers = _publishers(base / publishers_file, issuers, problems)

    if audience is None or url is None:
        return None
    return Settings(
        audience=audience,
        url=url.rstrip("/"),
        issuers=issuers,
        publishers=publishers,
        signing_key=signing_key,
        previous_signing_keys=previous,
        token_ttl=token_ttl,
        leeway=leeway,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        redis_replica_acks=redis_replica_acks,
        redis_replica_ack_timeout=float(redis_replica_ack_timeout),
        redis_sentinel_password=redis_sentinel_password,
        replay_fallback=replay_fallback,
        max_body=max_body,
        fetch_timeout=float(fetch_timeout),
        fetch_max_bytes=fetch_max_bytes,
        keys_ttl=keys_ttl,
        refresh_cooldown=refresh_cooldown,
        keys_max_age=keys_max_age,
        reload_interval=float(reload_interval),
        trusted_proxies=trusted_proxies,
        rate_limit_client=rate_limit_client,
        rate_limit_repository=rate_limit_repository,
        log_level=log_level,
        log_format=log_format,
        drain_seconds=float(drain_seconds),
        upstream=upstream,
        state_file=base / state_file,
        config_path=path,
        files=tuple(
            dict.fromkeys(
                [
                    path,
                    *([base / publishers_file] if publishers_file else []),
                    *([base / signing_key_file] if signing_key_file else []),
                    *(base / name for name in previous_files),
                    *(issuer.ca_bundle for issuer in issuers.values() if issuer.ca_bundle is not None),
                    *(issuer.jwks_file for issuer in issuers.values() if issuer.jwks_file is not None),
                ]
            )
        ),
    )


def _upstream(
    raw: Any, path: Path, environ: Mapping[str, str], problems: Problems, *, uploads: bool = True
) -> Upstream | None:
    if not isinstance(raw, dict):
        problems.add(path, "[upstream]", "must be a table")
        return None
    t = Table(raw, path, "[upstream]", problems)
    url = t.string("url", required=True)
    username = t.string("username", required=True)
    password_env = t.string("password_env", required=True)
    max_upload = t.number("max_upload", 100 * 1024 * 1024, minimum=1024)
    timeout = t.number("timeout", 300.0, minimum=1, integer=False)
    spool = t.string("spool_dir")
    max_concurrent_uploads = t.number("max_concurrent_uploads", 4, minimum=1, maximum=10_000)
    allow_http = t.get("allow_http", bool, False)
    t.finish()
    if url is not None and not is_base_url(url, schemes=("https", "http")):
        t.problem("url", f"must be an http(s) URL with no query or fragment (got {url!r})")
        url = None
    if url is not None and urlsplit(url).scheme == "http" and not allow_http and not _is_loopback(url):
        # The operator's index password goes in every upload's Authorization header.
        t.problem(
            "url",
            f"{url!r} is plain http to another host: the index password would cross the network in clear; use "
            "https, or set allow_http = true if that network is trusted",
        )
        url = None
    spool_dir = None
    if spool is not None:
        spool_dir = path.parent / spool
        # Like the password, the spool matters only where uploads are served (explain may run elsewhere).
        if uploads and (not spool_dir.is_dir() or not os.access(spool_dir, os.W_OK | os.X_OK)):
            t.problem("spool_dir", f"{spool_dir} is not a writable directory")
    # The password never sits in a config file: the file names the environment variable that holds it.
    password = environ.get(password_env) if password_env else None
    if password_env is not None and not password and uploads:
        t.problem("password_env", f"${password_env} is not set (it must hold the upstream index's password)")
    if url is None or username is None or not password:
        return None
    return Upstream(
        url=url,
        username=username,
        password=password,
        max_upload=max_upload,
        timeout=float(timeout),
        spool_dir=spool_dir,
        max_concurrent_uploads=max_concurrent_uploads,
        allow_http=allow_http,
    )


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _redis_prefix(t: Table) -> str:
    value = t.string("redis_prefix", "gateway:") or "gateway:"
    # Plain characters only: the prefix also goes into ACL key patterns (~PREFIX*) and SCAN patterns, where glob
    # characters, spaces or control characters would match other deployments' keys or none at all.
    if not _REDIS_PREFIX.fullmatch(value):
        t.problem(
            "redis_prefix",
            f"must be 1-64 letters, digits or '_', '-', '.', ':', starting with a letter or digit (got {value!r})",
        )
        return "gateway:"
    return value


def _networks(t: Table, key: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for value in t.strings(key) or ():
        try:
            networks.append(ip_network(value, strict=False))
        except ValueError:
            t.problem(key, f"{value!r} is not an IP address or network (like 10.0.0.0/8)")
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `amount` requests per `seconds`, as written in the config (e.g. "60/minute")."""

    amount: int
    seconds: int
    text: str

    def __str__(self) -> str:
        return self.text


_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 30 * 86400, "year": 365 * 86400}
_RATE = re.compile(
    r"\s*([0-9]{1,9})\s*(?:/|\s+per\s+)\s*([0-9]{1,9})?\s*(second|minute|hour|day|month|year)s?\s*", re.IGNORECASE
)


def parse_rates(text: str) -> tuple[Rate, ...]:
    """'10/second;100/hour' (also '100 per 5 minutes'; ',' or ';' between rates) as Rates; ValueError if not."""
    rates = []
    for part in re.split(r"[;,]", text):
        found = _RATE.fullmatch(part)
        if found is None:
            raise ValueError(f"{part.strip()!r} is not a rate")
        amount, count, unit = int(found[1]), int(found[2] or 1), found[3].lower()
        if amount < 1 or count < 1:
            raise ValueError(f"{part.strip()!r} must allow at least 1 request per at least 1 {unit}")
        rates.append(Rate(amount, count * _UNITS[unit], part.strip()))
    return tuple(rates)


def _rate(t: Table, key: str) -> str | None:
    value = t.string(key)
    if value is None:
        return None
    try:
        parse_rates(value)
    except ValueError:
        t.problem(key, f"{value!r} is not a rate like '60/minute' or '10/second;100/hour'")
        return None
    return value


def _choice(t: Table, key: str, choices: tuple[str, ...], default: str) -> str:
    value = t.string(key, default) or default
    if value not in choices:
        t.problem(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return default
    return value


def is_base_url(url: str, schemes: Iterable[str]) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a malformed port
    except ValueError:
        return False
    return (
        parts.scheme in schemes
        and bool(parts.hostname)
        and not parts.query
        and not parts.fragment
        and "#" not in url
        and "?" not in url
        and parts.username is None
        and url.isascii()
        and not any(c.isspace() for c in url)
    )


def _issuers(raw: Mapping[str, Any], path: Path, problems: Problems) -> dict[str, Issuer]:
    issuers: dict[str, Issuer] = {}
    urls: dict[str, str] = {}
    for name, table in raw.items():
        where = f"[issuers.{name}]"
        if not _NAME.fullmatch(name):
            problems.add(path, where, "name must be letters, digits, '-' or '_' (at most 64)")
        if not isinstance(table, dict):
            problems.add(path, where, "must be a table")
            continue
        t = Table(table, path, where, problems)
        url = t.string("url", required=True)
        kind = t.string("kind", required=True)
        namespaces = t.strings("namespaces") or ()
        ca_file = t.string("ca_bundle")
        jwks_name = t.string("jwks_file")
        algorithms = t.strings("algorithms") or ("RS256",)
        enabled = t.get("enabled", bool, True)
        require_protected_ref = t.get("require_protected_ref", bool, False)
        runner_environments = t.strings("runner_environments")
        pin_on_first_use = t.get("pin_on_first_use", bool, False)
        require_pins = t.get("require_pins", bool, False)
        # Read only when present: a wrong type is reported (and the config refused), the default never used.
        max_token_age = t.number("max_token_age", 1, minimum=1) if "max_token_age" in t.data else None
        deny = _deny(t)
        read_options = KINDS[kind].options if kind in KINDS else None
        options = read_options(t) if read_options is not None else None
        t.finish()
        if url is not None:
            if not is_base_url(url, schemes=("https",)):
                t.problem("url", f"must be an https URL with no query or fragment (got {url!r})")
            elif url in urls:
                t.problem("url", f"duplicates the url of [issuers.{urls[url]}]")
            urls.setdefault(url, name)
        if kind is not None and kind not in KINDS:
            t.problem("kind", f"must be one of {', '.join(sorted(KINDS))} (got {kind!r})")
        for namespace in namespaces:
            if namespace.startswith("/") or namespace.endswith("/") or "//" in namespace:
                t.problem("namespaces", f"{namespace!r} must be a path without leading or trailing '/'")
        for algorithm in algorithms:
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                t.problem(
                    "algorithms",
                    f"{algorithm!r} is not allowed; choose from {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}",
                )
        ca_bundle = ca_pem = None
        if ca_file is not None:
            ca_bundle = path.parent / ca_file
            ca_pem = _pem_certificates(ca_bundle)
            if ca_pem is None:
                t.problem("ca_bundle", f"{ca_bundle} is not a readable PEM certificate file")
        jwks_file = jwks = None
        if jwks_name is not None:
            jwks_file = path.parent / jwks_name
            jwks = _jwks_file(t, jwks_file, algorithms)
        if url is not None and kind is not None:
            issuers[name] = Issuer(
                name=name,
                url=url,
                kind=kind,
                namespaces=namespaces,
                ca_bundle=ca_bundle,
                ca_pem=ca_pem,
                algorithms=algorithms,
                enabled=enabled,
                require_protected_ref=require_protected_ref,
                runner_environments=runner_environments,
                pin_on_first_use=pin_on_first_use,
                require_pins=require_pins,
                max_token_age=max_token_age,
                deny=deny,
                jwks_file=jwks_file,
                jwks=jwks,
                options=options,
            )
    return issuers


def _jwks_file(t: Table, file: Path, algorithms: tuple[str, ...]) -> str | None:
    """The text of a `jwks_file` with at least one key that passes the key rules of fetched sets, or None."""
    try:
        text = file.read_text("utf-8")
        document = json.loads(text)
    except OSError as e:
        t.problem("jwks_file", f"{file} cannot be read: {e.strerror}")
        return None
    except ValueError as e:
        t.problem("jwks_file", f"{file} is not JSON: {e}")
        return None
    try:
        keys, dropped = parse_jwks(document, algorithms)
    except FetchError as e:
        t.problem("jwks_file", f"{file}: {e}")
        return None
    if not keys:
        why = f" ({'; '.join(dropped)})" if dropped else ""
        t.problem(
            "jwks_file",
            f"{file} has no usable key{why}; write it with `gateway probe-issuer URL --write-jwks {file.name}`",
        )
        return None
    return text


def _deny(t: Table) -> tuple[tuple[str, tuple[DenyValue, ...]], ...]:
    d = t.table("deny")
    if d is None:
        return ()
    deny = []
    for claim, values in d.data.items():
        d.seen.add(claim)
        if not isinstance(values, list) or not values:
            d.problem(claim, "must be a non-empty list of the claim values that refuse a token")
        elif not all(isinstance(value, str | int) for value in values):
            # Floats and tables are left out: their JSON equality is not what an operator would expect.
            d.problem(claim, "values must be strings, integers or true/false")
        else:
            deny.append((claim, tuple(values)))
    return tuple(deny)


def _pem_certificates(path: Path) -> bytes | None:
    """The bundle's certificates (PEM blocks only), if OpenSSL can load every one of them; else None."""
    try:
        content = path.read_bytes()
    except OSError:
        return None
    # Only the blocks: text around them (comments, in any encoding) is neither trusted nor part of the identity.
    blocks = _PEM_CERTIFICATE.findall(content)
    if not blocks:
        return None
    pem = b"\n".join(blocks) + b"\n"
    try:
        # Loaded once here, so a broken bundle is a config error naming the field, not a crash at start or reload.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError:
        return None
    return pem


def _signing_key(file: Path, path: Path, where: str, problems: Problems, *, private: bool = True) -> Key | None:
    def fail(message: str) -> None:
        problems.add(path, where, f"{file}: {message}")

    try:
        data = json.loads(file.read_text("utf-8"))
        key = import_key(data)
    except FileNotFoundError:
        fail("not found" + (f"; make one with `gateway keygen --out {file}`" if private else ""))
        return None
    except OSError as e:
        fail(f"cannot be read: {e.strerror}")
        return None
    except (ValueError, JoseError, TypeError, KeyError) as e:
        fail(f"is not a JWK: {e}")
        return None
    if not (
        (isinstance(key, ECKey) and key.curve_name == "P-256")
        or (isinstance(key, OKPKey) and key.curve_name == "Ed25519")
    ):
        fail("must be an EC P-256 (ES256) or OKP Ed25519 key")
        return None
    if private and not key.is_private:
        fail("must be a private key (make one with `gateway keygen`)")
        return None
    return key


def _publishers(file: Path, issuers: Mapping[str, Issuer], problems: Problems) -> tuple[Publisher, ...]:
    raw = _read_toml(file, problems)
    if raw is None:
        return ()
    for key in sorted(set(raw) - {"publisher"}):
        problems.add(file, f"[{key}]", "unknown table (publishers are [[publisher]] entries)")
    entries = raw.get("publisher", [])
    if not isinstance(entries, list):
        problems.add(file, "publisher", "must be an array of tables ([[publisher]])")
        return ()
    publishers = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            problems.add(file, f"[[publisher]] #{number}", "must be a table")
            continue
        publisher = _publisher(entry, file, f"[[publisher]] #{number}", issuers, problems)
        if publisher is not None:
            publishers.append(publisher)
    return tuple(publishers)


def _publisher(
    entry: Mapping[str, Any], file: Path, where: str, issuers: Mapping[str, Issuer], problems: Problems
) -> Publisher | None:
    t = Table(entry, file, where, problems)
    issuer_name = t.string("issuer", required=True)
    repository = t.string("repository", required=True)
    workflow = t.string("workflow", required=True)
    environment = t.string("environment")
    owner_id = t.string("owner_id")
    repository_id = t.string("repository_id")
    refs = t.strings("refs")
    projects = t.strings("projects")
    if projects is None and "projects" not in entry:
        t.problem("projects", "is required")
    t.finish()

    issuer = issuers.get(issuer_name) if issuer_name else None
    if issuer_name is not None and issuer is None:
        t.problem("issuer", f"names no issuer in [issuers] (got {issuer_name!r}){did_you_mean(issuer_name, issuers)}")
    if repository is not None:
        problem = _repository_problem(repository)
        if problem:
            t.problem("repository", problem)
            repository = None
        elif issuer is not None and issuer.namespaces and not under_namespaces(repository, issuer.namespaces):
            t.problem(
                "repository",
                f"{repository!r} is outside the namespaces of [issuers.{issuer.name}] "
                f"({', '.join(issuer.namespaces)})",
            )
    if workflow is not None and (workflow.startswith("/") or ".." in workflow.split("/")):
        t.problem("workflow", "must be a path relative to the repository root")
        workflow = None
    check_workflow = KINDS[issuer.kind].workflow_problem if issuer is not None else None
    if workflow is not None and check_workflow is not None:
        problem = check_workflow(workflow)
        if problem is not None:
            t.problem("workflow", problem)
            workflow = None
    if refs == ():
        t.problem("refs", "must name at least one ref pattern (leave it out to accept every ref)")
    for pattern in refs or ():
        problem = ref_pattern_problem(pattern)
        if problem is not None:
            t.problem("refs", problem)
            refs = None
    if issuer is not None and issuer.require_pins:
        for key, value in (("repository_id", repository_id), ("owner_id", owner_id)):
            if value is None:
                t.problem(
                    key,
                    f"is required: [issuers.{issuer.name}] require_pins = true. Run `gateway explain TOKEN` on an "
                    "ID token from this repository's CI job (or read the project_id and namespace_id claims for "
                    "GitLab, repository_id and repository_owner_id for GitHub); it prints the repository_id and "
                    "owner_id to pin",
                )
    for project in projects or ():
        if not _PROJECT.fullmatch(project):
            t.problem("projects", f"{project!r} is not a valid project name")
            projects = None
    if projects == ():
        t.problem("projects", "must name at least one project")
    if "refs" in entry and refs is None:
        return None
    if issuer_name is None or issuer is None or repository is None or workflow is None or not projects:
        return None
    return Publisher(
        issuer=issuer_name,
        repository=repository,
        workflow=workflow,
        environment=environment,
        owner_id=owner_id,
        repository_id=repository_id,
        refs=refs,
        projects=tuple(dict.fromkeys(normalize_project(p) for p in projects)),
    )


def _repository_problem(repository: str) -> str | None:
    if not repository.isascii():
        return "must be ASCII (GitLab and GitHub paths are)"
    segments = repository.split("/")
    if len(segments) < 2 or not all(segments):
        return "must be a full path like 'group/project' (no leading, trailing or double '/')"
    return None

