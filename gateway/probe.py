"""`gateway probe-issuer`: the contract's discovery and key rules (section 5), checked one by one against a candidate.

An operator runs it before adding an issuer to `issuers.toml`. The fetching is the gateway's own (`keys.fetch.Fetcher`:
no redirects, the byte cap, one deadline for discovery and keys together), so a candidate that passes here is
one the gateway can use, and every rule prints the evidence it was judged on. A jwks_uri the gateway would refuse
is never contacted. The probe is stricter than the gateway in two places, because both mean some of the issuer's
tokens would be refused: a published key the gateway would drop fails a rule (the issuer may sign with it), and so
does a discovery document whose `id_token_signing_alg_values_supported` names none of the algorithms the issuer
would be configured with.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import os
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .config import Issuer, Settings, is_base_url
from .keys.fetch import Fetcher, FetchError, parse_jwks, rsa_bits, same_origin


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 -- a verdict, not a password
    FAIL = "FAIL"
    # Not checked: an earlier failure made the rule impossible to check, or unsafe (a jwks_uri the gateway refuses).
    SKIP = "SKIP"


PASS, FAIL, SKIP = Status.PASS, Status.FAIL, Status.SKIP

# The gateway's defaults for [gateway] fetch_timeout and fetch_max_bytes, read from Settings so they cannot drift.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}
DEFAULT_TIMEOUT: float = float(_DEFAULTS["fetch_timeout"])
DEFAULT_MAX_BYTES: int = int(_DEFAULTS["fetch_max_bytes"])

# Rule ids in the order they are checked and printed.
RULES = ("url", "discovery", "issuer", "jwks_uri", "algorithms", "jwks", "kids", "keys", "usable")


class ProbeError(Exception):
    """The probe cannot run as asked (an unusable CA bundle); no rule was checked."""


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    id: str
    status: Status
    name: str
    evidence: tuple[str, ...] = ()

    def render(self) -> list[str]:
        return [f"{self.status:<6}{self.name}", *(f"      {line}" for line in self.evidence)]


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    url: str
    rules: tuple[Rule, ...]
    # The published keys the gateway would use (the key rules hold for them), as published: for `--write-jwks`.
    usable_jwks: tuple[Mapping[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return all(rule.status == PASS for rule in self.rules)

    def rule(self, rule_id: str) -> Rule:
        return next(rule for rule in self.rules if rule.id == rule_id)

    def render(self) -> str:
        lines = [line for rule in self.rules for line in rule.render()]
        failed = [rule.name for rule in self.rules if rule.status == FAIL]
        skipped = sum(rule.status == SKIP for rule in self.rules)
        if self.ok:
            lines.append(f"ok: all {len(self.rules)} rules hold; the gateway can use {self.url} as an issuer")
        else:
            lines.append(
                f"refused: {len(failed)} of {len(self.rules)} rules fail"
                + (f" and {skipped} could not be checked" if skipped else "")
                + f" ({'; '.join(failed)})"
            )
        return "\n".join(lines) + "\n"


def _names(url: str, algorithms: tuple[str, ...], timeout: float, max_bytes: int) -> dict[str, str]:
    limits = f"no redirect, at most {max_bytes} bytes"
    return {
        "url": "issuer URL is https with no query or fragment",
        "discovery": f"discovery fetched ({limits}, within the {timeout:g} s deadline)",
        "issuer": f"discovery issuer equals {url}",
        "jwks_uri": "discovery jwks_uri is https on the issuer's origin",
        "algorithms": f"discovery id_token_signing_alg_values_supported includes {' or '.join(algorithms)}",
        "jwks": f"JWKS fetched ({limits}, within the same deadline)",
        "kids": "no duplicate key ids",
        "keys": "every published key is usable by the gateway",
        "usable": "at least one usable signing key",
    }


async def probe(
    url: str,
    *,
    ca_bundle: Path | None = None,
    algorithms: tuple[str, ...] = ("RS256",),
    fetch_timeout: float = DEFAULT_TIMEOUT,
    fetch_max_bytes: int = DEFAULT_MAX_BYTES,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Report:
    """Check a candidate issuer URL against every discovery and key rule, fetching exactly as the gateway would."""
    names = _names(url, algorithms, fetch_timeout, fetch_max_bytes)
    if not is_base_url(url, schemes=("https",)):
        why = f"{url!r} is not an https URL without query, fragment or credentials; no request was sent"
        return _report(url, names, {"url": (FAIL, [why])})
    issuer = Issuer(name="probe", url=url, kind="probe", ca_bundle=ca_bundle, algorithms=algorithms)
    try:
        fetcher = Fetcher(issuer, transport=transport, timeout=fetch_timeout, max_bytes=fetch_max_bytes)
    except (OSError, ssl.SSLError) as e:
        raise ProbeError(f"cannot use the CA bundle {ca_bundle}: {e}") from None
    try:
        prober = _Probe(fetcher)
        verdicts = await prober.run()
        return dataclasses.replace(_report(url, names, verdicts), usable_jwks=prober.usable)
    finally:
        await fetcher.aclose()


Verdicts = dict[str, tuple[Status, list[str]]]


def _report(url: str, names: Mapping[str, str], verdicts: Verdicts) -> Report:
    rules = []
    for rule_id in RULES:
        status, evidence = verdicts.get(rule_id, (SKIP, []))
        rules.append(Rule(rule_id, status, names[rule_id], tuple(evidence)))
    return Report(url=url, rules=tuple(rules))


class _Probe:
    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self.issuer = fetcher.issuer
        self.responses: list[httpx.Response] = []
        # Only observes: status and byte counts are read after the gateway's own fetching code has run.
        hooks = fetcher.client.event_hooks
        hooks["response"] = [*hooks.get("response", []), self._record]
        fetcher.client.event_hooks = hooks
        self.deadline = 0.0
        self.usable: tuple[Mapping[str, Any], ...] = ()

    async def _record(self, response: httpx.Response) -> None:
        self.responses.append(response)

    async def run(self) -> Verdicts:
        verdicts: Verdicts = {"url": (PASS, [self.issuer.url])}
        # One deadline for discovery and keys together, as Fetcher.fetch has it.
        self.deadline = asyncio.get_running_loop().time() + self.fetcher.timeout
        discovery_url = self.issuer.url.rstrip("/") + "/.well-known/openid-configuration"
        discovery, verdicts["discovery"] = await self._get(discovery_url)
        if verdicts["discovery"][0] == PASS and not isinstance(discovery, dict):
            verdicts["discovery"] = (FAIL, [*verdicts["discovery"][1], "the document is not a JSON object"])
        if not isinstance(discovery, dict) or verdicts["discovery"][0] != PASS:
            return verdicts
        verdicts["issuer"] = self._issuer(discovery.get("issuer"))
        verdicts["jwks_uri"] = self._jwks_uri(discovery.get("jwks_uri"))
        verdicts["algorithms"] = self._algorithms(discovery.get("id_token_signing_alg_values_supported"))
        try:
            # The gateway's own verdict on the document decides whether its jwks_uri is contacted at all.
            jwks_uri = self.fetcher.check_discovery(discovery)
        except FetchError:
            return verdicts
        jwks, verdicts["jwks"] = await self._get(jwks_uri)
        if verdicts["jwks"][0] != PASS:
            return verdicts
        try:
            parse_jwks(jwks, self.issuer.algorithms)
        except FetchError as e:
            verdicts["jwks"] = (FAIL, [*verdicts["jwks"][1], str(e)])
            return verdicts
        verdicts |= self._keys(jwks["keys"])
        return verdicts

    async def _get(self, url: str) -> tuple[Any, tuple[Status, list[str]]]:
        self.responses.clear()
        started = time.monotonic()
        document: Any = None
        problem = None
        try:
            async with asyncio.timeout_at(self.deadline):
                document = await self.fetcher.get_json(url)
        except TimeoutError:
            problem = f"fetching discovery and keys took longer than {self.fetcher.timeout:g} s"
        except FetchError as e:
            problem = str(e)
        elapsed = f"{(time.monotonic() - started) * 1000:.0f} ms"
        evidence = [f"GET {url}"]
        if self.responses:
            response = self.responses[-1]
            declared = response.headers.get("content-length")
            length = f" (Content-Length {declared})" if declared is not None else ""
            evidence.append(f"HTTP {response.status_code}, {response.num_bytes_downloaded} bytes{length}, {elapsed}")
        else:
            evidence.append(f"no response after {elapsed}")
        if problem is None:
            return document, (PASS, evidence)
        if "CERTIFICATE_VERIFY_FAILED" in problem:
            problem += " (an issuer with a private CA needs --ca-bundle, as its table needs ca_bundle)"
        return None, (FAIL, [*evidence, problem])

    def _issuer(self, issuer: Any) -> tuple[Status, list[str]]:
        if issuer == self.issuer.url:
            return PASS, [f"issuer: {issuer!r}"]
        return FAIL, [f"issuer: {issuer!r}; tokens' iss and the configured url must be exactly {self.issuer.url!r}"]

    def _jwks_uri(self, jwks_uri: Any) -> tuple[Status, list[str]]:
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme != "https":
            return FAIL, [f"jwks_uri: {jwks_uri!r} is not an https URL; not fetched"]
        if not same_origin(jwks_uri, self.issuer.url):
            return FAIL, [
                f"jwks_uri: {jwks_uri!r} is not on the origin (scheme, host, port) of the issuer; not fetched"
            ]
        return PASS, [f"jwks_uri: {jwks_uri!r}"]

    def _algorithms(self, advertised: Any) -> tuple[Status, list[str]]:
        if not isinstance(advertised, list) or not all(isinstance(a, str) for a in advertised):
            # The gateway goes by the keys and the token's own alg, so a missing list is worth a note, not a failure.
            return PASS, [f"not advertised (got {advertised!r}); the gateway does not need it, the keys decide"]
        listed = f"advertised: {', '.join(map(_text, advertised)) or 'nothing'}"
        if any(a in self.issuer.algorithms for a in advertised):
            return PASS, [listed]
        return FAIL, [listed, "configure the issuer's `algorithms` to what it signs with (and probe with --algorithm)"]

    def _keys(self, entries: list[Any]) -> Verdicts:
        algorithms = self.issuer.algorithms
        kids = Counter(kid for kid in map(_kid, entries) if kid is not None)
        duplicates = sorted(kid for kid, count in kids.items() if count > 1)
        if duplicates:
            kid_verdict = (
                FAIL,
                [f"kid {kid!r} appears {kids[kid]} times; the gateway drops every key under it" for kid in duplicates],
            )
        else:
            kid_verdict = (PASS, [f"{len(entries)} key(s), {len(kids)} distinct kid(s)"])

        lines = []
        all_usable = True
        for number, entry in enumerate(entries, start=1):
            kid = _kid(entry)
            label = f"key #{number}" if kid is None else f"kid {kid!r}"
            # The gateway's judgement of this one key; duplicates only show in the whole set.
            accepted, dropped = parse_jwks({"keys": [entry]}, algorithms)
            reason = None
            if kid in duplicates:
                reason = "duplicate kid"
            elif not accepted:
                reason = dropped[0].partition(": ")[2] if dropped else "not usable"
            all_usable = all_usable and reason is None
            lines.append(f"{label}: {_describe(entry)}: {'accepted' if reason is None else 'dropped, ' + reason}")
        usable, _ = parse_jwks({"keys": entries}, algorithms)
        self.usable = tuple(entry for entry in entries if _kid(entry) in usable)
        return {
            "kids": kid_verdict,
            "keys": (PASS if all_usable else FAIL, lines or ["the key set is empty"]),
            "usable": (PASS, [f"usable: {', '.join(map(repr, usable))}"])
            if usable
            else (FAIL, ["no key the gateway could verify with (and it never caches an empty set)"]),
        }


def _describe(entry: Any) -> str:
    """Type, size or curve, alg and use of one published key, never its key material."""
    if not isinstance(entry, dict):
        return f"not a JSON object ({type(entry).__name__})"
    parts = [_text(entry.get("kty", "no kty"))]
    if entry.get("kty") == "RSA":
        parts.append(f"{rsa_bits(entry.get('n'))} bits")
    elif "crv" in entry:
        parts.append(f"curve {_text(entry['crv'])}")
    parts.append(f"alg {_text(entry['alg'])}" if "alg" in entry else "no alg")
    parts.append(f"use {_text(entry['use'])}" if "use" in entry else "no use")
    return ", ".join(parts)


def _kid(entry: Any) -> str | None:
    kid = entry.get("kid") if isinstance(entry, dict) else None
    return kid if isinstance(kid, str) else None


def _text(value: Any) -> str:
    """A value from the candidate issuer, shown as is only when it is short plain text (no terminal escapes)."""
    if isinstance(value, str) and value.isascii() and value.isprintable() and len(value) <= 64:
        return value
    return repr(value)[:80]


def write_jwks(path: Path, keys: tuple[Mapping[str, Any], ...]) -> None:
    """Write a JWKS file for `[issuers.X] jwks_file` atomically: readers (a gateway watching it) see the old file or
    the new one, never half of one. Raises OSError."""
    document = json.dumps({"keys": list(keys)}, indent=2) + "\n"
    # In the target's directory, so os.replace is a rename within one file system.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(document)
            f.flush()
            os.fsync(f.fileno())
        # Public keys: readable by the gateway's user whoever runs the probe.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
