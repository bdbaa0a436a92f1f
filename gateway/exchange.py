"""The token exchange: verify an ID token, match it to publishers, spend its jti, mint an upload token.

The order is the security argument. The unverified `iss` only picks a verifier (a token naming no trusted issuer
is refused for that, whatever its header says); the header rules and an algorithm the issuer does not use are
checked before any network I/O; the signature is checked before any claim is believed; the jti is
spent only once a publisher matched (so a token refused for a fixable reason stays usable) and before minting
(so two concurrent requests with one token cannot both mint). Everything that can fail on the token's content
fails before the spend: claim strings holding lone surrogates (which no UTF-8 encoder takes) are refused at
verification, and the minted token's claims are built and encoded before the spend, leaving only the signature.

Two operator checks sit between the identity and the spend (gateway.state). A revocation is checked as soon as
the identity is known: an operator who revoked a repository in an emergency wants nothing of it to mint, whatever
publisher it would match. The pin is checked once a publisher matched, and the first mint records it (first writer
wins, in the shared store): a repository deleted and re-created under the same path (new numeric ids) cannot
inherit the publisher. A pin that is due but cannot be recorded fails the mint closed, like a jti that cannot be
spent.

The checks, in order (each a call into its own module or function):
  1. peek: `iss` -> configured Issuer (exact match, no I/O for an unknown one); suspended issuer refused.
  2. algorithm allowed for the issuer; key by kid (keys/: fetched, shared, or an issuer's jwks_file, which
     refuses an unknown kid at once); signature and registered claims (jose.py).
  3. check_age: `[issuers.X] max_token_age` on `iat` (invalid-token): a leaked token stops working early.
  4. the kind's claims -> Identity (issuers/): kind-specific refusals (fork pipelines, pull_request_target...).
  5. check_policy: the issuer's rules on the identity and raw claims, whatever publisher would match
     (namespaces, protected ref, runner environment, `[issuers.X.deny]`).
     Then the per-repository rate limit is counted (every verified attempt, matched or not), and revocations
     checked (check_revoked): they refuse whatever would match.
  6. match: publishers of this issuer and repository, field by field (publishers.compare: workflow,
     environment, repository_id, owner_id, refs); then check_match: the kind's last word on the match
     (GitLab require_protected_environment), with no fallback to another publisher.
     Then the pin on first use (check_pin), which compares ids once a publisher matched.
  7. the upload token's claims built and encoded, the jti spent (only now, so a token refused above stays usable
     once fixed), then the upload token signed.
Steps 3 to 6, without revocations and pins (operator state, not config), are pure functions of (settings, claims,
time): `decide` runs them, and `check --replay` (replay.py) re-runs them against another config.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import MAX_LEEWAY, Settings
from .errors import InvalidPayload, InvalidPublisher, InvalidToken, ReplayStoreUnavailable, ReusedToken
from .identity import Identity
from .issuers import KINDS, Issuer
from .jose import VerifiedClaims, Verifier, peek
from .keys.cache import Keys
from .mint import Minted, Signer
from .publishers import Match, Publisher, Publishers, under_namespaces
from .ratelimit import RateLimits
from .runtime import Runtime
from .state import FileState, Pin, State, StateUnavailable
from .store import Store, jti_key


@dataclass(slots=True)
class Attempt:
    """What is known so far about one mint attempt, filled in as the exchange goes: for the audit log and
    metrics only, never for decisions. `jti` is the hashed key the jti is spent under, never the jti itself."""

    client: str | None = None
    issuer: str | None = None
    identity: Identity | None = None
    jti: str | None = None
    publishers: tuple[Publisher, ...] = ()
    projects: tuple[str, ...] = ()
    # The revocation that refused this attempt, and what its pin check did ("recorded", "held", "changed").
    revocation: str | None = None
    pin: str | None = None
    # The verified claims (set once the signature held) and the time they were judged at, for replay.
    claims: VerifiedClaims | None = None
    at: float | None = None


class Verified(NamedTuple):
    issuer: Issuer
    claims: VerifiedClaims
    identity: Identity


class Exchanged(NamedTuple):
    verified: Verified
    match: Match
    minted: Minted


class Exchange:
    """The pipeline, reading everything a config implies from one frozen `Runtime`, swapped whole by a reload.

    Each request takes the runtime once and uses it to the end, so it never mixes an old and a new config.
    """

    def __init__(
        self, runtime: Runtime, *, store: Store, clock: Callable[[], float], state: State | None = None
    ) -> None:
        self.runtime = runtime
        # Pins and revocations (gateway.state): durable operator state, like the store not part of a config.
        self.state: State = state if state is not None else FileState(None)
        self.store = store
        self.clock = clock

    def switch(self, runtime: Runtime) -> Runtime:
        """Put `runtime` in force (one assignment: no request sees half of it); returns the one it replaces."""
        previous, self.runtime = self.runtime, runtime
        return previous

    # Read-only views of the runtime in force, for the routes, the upload proxy, explain and tests.
    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def publishers(self) -> Publishers:
        return self.runtime.publishers

    @property
    def verifiers(self) -> Mapping[str, Verifier]:
        return self.runtime.verifiers

    @property
    def keys(self) -> Keys:
        return self.runtime.keys

    @property
    def signer(self) -> Signer:
        return self.runtime.signer

    @property
    def limits(self) -> RateLimits | None:
        return self.runtime.limits

    async def verify(self, raw: str, attempt: Attempt | None = None, *, runtime: Runtime | None = None) -> Verified:
        attempt = attempt if attempt is not None else Attempt()
        runtime = runtime or self.runtime
        if raw.strip() in ("", "null"):
            raise InvalidPayload(missing_token(runtime.settings.audience))
        token = peek(raw)
        issuer = runtime.settings.by_url.get(token.issuer)
        if issuer is None:
            # Exact match only, and no network I/O: an attacker's `iss` never becomes a URL we fetch.
            raise InvalidPayload(f"issuer {token.issuer[:200]!r} is not trusted by this gateway")
        attempt.issuer = issuer.name
        if not issuer.enabled:
            raise InvalidPayload(f"issuer {issuer.name!r} is suspended by this gateway's operator")
        verifier = runtime.verifiers[issuer.name]
        verifier.check_header(token)
        key = await runtime.keys.key(issuer.name, token.kid)
        claims = verifier.verify(token, key, header_checked=True)
        # Keyed by the issuer's URL (what signed it), not its config name, so renaming an issuer in a reload
        # cannot make spent tokens new again.
        attempt.jti = jti_key(issuer.url, claims["jti"])
        attempt.claims, attempt.at = claims, self.clock()
        check_age(issuer, claims, attempt.at)
        identity = KINDS[issuer.kind].identity(issuer, claims)
        attempt.identity = identity
        check_policy(issuer, claims, identity)
        return Verified(issuer=issuer, claims=claims, identity=identity)

    def match(self, verified: Verified, *, runtime: Runtime | None = None) -> Match:
        publishers = (runtime or self.runtime).publishers
        return match(publishers, verified.issuer, verified.claims, verified.identity)

    async def exchange(self, raw: str, attempt: Attempt | None = None) -> Exchanged:
        attempt = attempt if attempt is not None else Attempt()
        runtime = self.runtime
        verified = await self.verify(raw, attempt, runtime=runtime)
        if runtime.limits is not None:
            # Counted for every verified attempt, matched or not: a repository cannot probe publishers freely.
            await runtime.limits.hit_repository(verified.issuer.url, verified.identity.repository)
        await self.check_revoked(verified, attempt)
        match = self.match(verified, runtime=runtime)
        attempt.publishers, attempt.projects = match.publishers, match.projects
        if verified.issuer.pin_on_first_use:  # checked here: a coroutine per mint costs more than the test
            await self.check_pin(verified, match, attempt)
        now = self.clock()
        # Remember the jti for as long as any clock within the *largest* leeway a config may set could still accept
        # the token, not the leeway in force: a reload raising it must not make a spent token new again.
        ttl = max(1.0, verified.claims["exp"] + MAX_LEEWAY - now + 1)
        settings = runtime.settings
        # Built and encoded before the spend, so nothing about the token's content can fail once its jti is gone;
        # only the signature is left for after.
        unsigned = runtime.signer.prepare(
            identity=verified.identity,
            projects=match.projects,
            issuer=settings.url,
            audience=settings.audience,
            ttl=settings.token_ttl,
            now=now,
        )
        # The key verify() put on the attempt: hashed once per mint.
        assert attempt.jti is not None
        if not await self.store.spend(attempt.jti, ttl):
            raise ReusedToken("this ID token was already exchanged; each ID token can be used once")
        return Exchanged(verified=verified, match=match, minted=runtime.signer.sign(unsigned))

    async def check_revoked(self, verified: Verified, attempt: Attempt) -> None:
        identity = verified.identity
        try:
            revocation = await self.state.revoked(identity.issuer_url, identity.repository, verified.claims["iat"])
        except StateUnavailable:
            raise ReplayStoreUnavailable(
                "the gateway cannot read its revocations from the shared store yet; retry shortly"
            ) from None
        if revocation is not None:
            attempt.revocation = revocation.id
            raise InvalidPublisher(
                f"publishing from repository {identity.repository!r} of issuer {identity.issuer!r} is revoked by "
                f"this gateway's operator (revocation {revocation.id}): {revocation.reason}"
            )

    async def check_pin(self, verified: Verified, match: Match, attempt: Attempt) -> None:
        """For an issuer with `pin_on_first_use`: refuse a repository whose ids changed since its first mint;
        record them at the first."""
        if all(_pinned_statically(p) for p in match.publishers):
            return
        identity = verified.identity
        if identity.repository_id is None and identity.owner_id is None:
            raise InvalidPublisher(
                f"issuer {identity.issuer!r} pins repositories on first use, but this token carries neither a "
                "repository id nor an owner id to pin"
            )
        seen = Pin(
            issuer_url=identity.issuer_url,
            repository=identity.repository,
            repository_id=identity.repository_id,
            owner_id=identity.owner_id,
            pinned_at=self.clock(),
        )
        try:
            pinned, recorded = await self.state.pin(seen)
        except StateUnavailable:
            raise ReplayStoreUnavailable(
                "the shared store did not answer, so this repository's identity could not be pinned; retry shortly"
            ) from None
        if pinned.same_ids(seen):
            attempt.pin = "recorded" if recorded else "held"
            return
        attempt.pin = "changed"
        changes = [
            (what, f"{name} was {old!r} when first seen, the token has {new!r}")
            for what, name, old, new in (
                ("repository", "repository id", pinned.repository_id, seen.repository_id),
                ("owner", "owner id", pinned.owner_id, seen.owner_id),
            )
            if old != new
        ]
        raise InvalidPublisher(
            f"the {' and '.join(what for what, _ in changes)} of {identity.repository!r} (issuer {identity.issuer!r}) "
            f"changed identity since it was first seen ({'; '.join(text for _, text in changes)}); a deleted and "
            "re-created project does not inherit its publisher: ask the gateway's operator to check and, if this is "
            "the rightful project, `gateway pins forget` the old pin"
        )


def missing_token(audience: str) -> str:
    """What to fix when a job sends no token: its ID token request failed, and the script went on regardless."""
    return (
        "the token is empty (or the text 'null'): the job's ID token request failed or its result was not passed "
        f"on. Check the job's ID token setup (GitLab: `id_tokens:` with `aud: {audience}`; GitHub: "
        f"`permissions: id-token: write`) and run `python -m id {audience}` in the job to see why it fails"
    )


def decide(
    publishers: Publishers, issuer: Issuer, claims: Mapping[str, Any], at: float
) -> tuple[Identity, Match]:
    """Steps 3 to 6 of the exchange for claims whose signature already held: the identity and what it matches."""
    check_age(issuer, claims, at)
    identity = KINDS[issuer.kind].identity(issuer, claims)
    check_policy(issuer, claims, identity)
    return identity, match(publishers, issuer, claims, identity)


def match(publishers: Publishers, issuer: Issuer, claims: Mapping[str, Any], identity: Identity) -> Match:
    kind = KINDS[issuer.kind]
    result = publishers.match(identity, environment_case_sensitive=kind.environment_case_sensitive)
    if kind.check_match is not None:
        kind.check_match(issuer, claims, result)
    return result


def check_age(issuer: Issuer, claims: Mapping[str, Any], now: float) -> None:
    """`max_token_age`: a token older than that is refused, with no leeway, however far away its `exp` is.

    CI platforms issue ID tokens that live for hours; a token leaked from a job log stays valid that long. The
    operator caps how long after issuing a token may still be exchanged (jobs exchange theirs at once).
    """
    if issuer.max_token_age is None:
        return
    age = now - claims["iat"]
    if age > issuer.max_token_age:
        raise InvalidToken(
            f"token was issued {int(age)} s ago; issuer {issuer.name!r} accepts tokens at most "
            f"{issuer.max_token_age} s old (request a fresh ID token in the job that publishes)"
        )


def check_policy(issuer: Issuer, claims: Mapping[str, Any], identity: Identity) -> None:
    """The operator's rules for every token of an issuer, whichever publisher it would match."""
    check_deny(issuer, claims)
    if issuer.namespaces and not under_namespaces(identity.repository, issuer.namespaces):
        raise InvalidPublisher(
            f"repository {identity.repository!r} is outside the namespaces this gateway trusts for issuer "
            f"{issuer.name!r}"
        )
    if issuer.require_protected_ref and identity.protected_ref is not True:
        raise InvalidPublisher(
            f"ref {identity.ref!r} is not protected, and issuer {issuer.name!r} only publishes from protected "
            "refs (protect the branch or tag, or publish from one that is)"
        )
    if issuer.runner_environments is not None and identity.runner_environment not in issuer.runner_environments:
        raise InvalidPublisher(
            f"the job ran on a {identity.runner_environment or 'unknown'!r} runner; issuer {issuer.name!r} only "
            f"publishes from {', '.join(issuer.runner_environments)} runners"
        )


def _pinned_statically(publisher: Publisher) -> bool:
    """A publisher that names both ids is pinned by its operator; the dynamic pin would add nothing."""
    return publisher.owner_id is not None and publisher.repository_id is not None


def check_deny(issuer: Issuer, claims: Mapping[str, Any]) -> None:
    """`[issuers.X.deny]`: a raw claim equal to a listed value (or a list claim holding one) refuses the token.

    Compared as JSON values, types included: `true` is not "true", and 1 is not true.
    """
    for name, values in issuer.deny:
        if name not in claims:
            continue
        value = claims[name]
        candidates = value if isinstance(value, list) else [value]
        for candidate in candidates:
            if any(type(candidate) is type(denied) and candidate == denied for denied in values):
                raise InvalidPublisher(
                    f"claim {name!r} is {json.dumps(candidate)[:200]}, which issuer {issuer.name!r} refuses "
                    f"([issuers.{issuer.name}.deny] {name})"
                )
