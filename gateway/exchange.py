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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import MAX_LEEWAY, Issuer, Settings
from .errors import InvalidPayload, InvalidPublisher, ReplayStoreUnavailable, ReusedToken
from .identity import Identity
from .issuers import KINDS
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


@dataclass(frozen=True, slots=True)
class Verified:
    issuer: Issuer
    claims: VerifiedClaims
    identity: Identity


@dataclass(frozen=True, slots=True)
class Exchanged:
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
        claims = verifier.verify(token, key)
        # Keyed by the issuer's URL (what signed it), not its config name, so renaming an issuer in a reload
        # cannot make spent tokens new again.
        attempt.jti = jti_key(issuer.url, claims["jti"])
        identity = KINDS[issuer.kind].identity(issuer, claims)
        attempt.identity = identity
        check_policy(issuer, identity)
        return Verified(issuer=issuer, claims=claims, identity=identity)

    def match(self, verified: Verified, *, runtime: Runtime | None = None) -> Match:
        kind = KINDS[verified.issuer.kind]
        publishers = (runtime or self.runtime).publishers
        return publishers.match(verified.identity, environment_case_sensitive=kind.environment_case_sensitive)

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
        if not await self.store.spend(jti_key(verified.issuer.url, verified.claims["jti"]), ttl):
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
        """Refuse a repository whose ids changed since its first mint; record them at the first."""
        if not verified.issuer.pin_on_first_use or all(_pinned_statically(p) for p in match.publishers):
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


def check_policy(issuer: Issuer, identity: Identity) -> None:
    """The operator's rules for every token of an issuer, whichever publisher it would match."""
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
    return publisher.owner_id is not None and getattr(publisher, "repository_id", None) is not None
