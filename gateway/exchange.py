"""The token exchange: verify an ID token, match it to publishers, spend its jti, mint an upload token.

The order is the security argument. The unverified `iss` only picks a verifier (a token naming no trusted issuer
is refused for that, whatever its header says); the header rules and an algorithm the issuer does not use are
checked before any network I/O; the signature is checked before any claim is believed; the jti is
spent only once a publisher matched (so a token refused for a fixable reason stays usable) and before minting
(so two concurrent requests with one token cannot both mint). Everything that can fail on the token's content
fails before the spend: claim strings holding lone surrogates (which no UTF-8 encoder takes) are refused at
verification, and the minted token's claims are built and encoded before the spend, leaving only the signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import MAX_LEEWAY, Issuer, Settings
from .errors import InvalidPayload, InvalidPublisher, ReusedToken
from .identity import Identity
from .issuers import KINDS
from .jose import VerifiedClaims, Verifier, peek
from .keys.cache import Keys
from .mint import Minted, Signer
from .publishers import Match, Publisher, Publishers, under_namespaces
from .ratelimit import RateLimits
from .runtime import Runtime
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

    def __init__(self, runtime: Runtime, *, store: Store, clock: Callable[[], float]) -> None:
        self.runtime = runtime
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
        match = self.match(verified, runtime=runtime)
        attempt.publishers, attempt.projects = match.publishers, match.projects
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
