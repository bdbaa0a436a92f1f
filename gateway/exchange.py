"""The token exchange: verify an ID token, match it to publishers, spend its jti, mint an upload token.

The order is the security argument. The unverified `iss` only picks a verifier; an algorithm the issuer does
not use is refused before any network I/O; the signature is checked before any claim is believed; the jti is
spent only once a publisher matched (so a token refused for a fixable reason stays usable) and before minting
(so two concurrent requests with one token cannot both mint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Issuer, Settings
from .errors import InvalidPayload, InvalidPublisher, ReusedToken
from .identity import Identity
from .issuers import KINDS
from .jose import VerifiedClaims, Verifier, peek
from .keys import Keys
from .mint import Minted, Signer
from .publishers import Match, Publisher, Publishers, under_namespaces
from .ratelimit import RateLimits
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
    def __init__(
        self,
        settings: Settings,
        *,
        keys: Keys,
        store: Store,
        signer: Signer,
        clock: Callable[[], float],
        limits: RateLimits | None = None,
    ) -> None:
        self.keys = keys
        self.limits = limits
        self.store = store
        self.signer = signer
        self.clock = clock
        self.settings = settings
        self.publishers = Publishers(settings.publishers)
        self.verifiers = self._verifiers(settings)

    def _verifiers(self, settings: Settings) -> dict[str, Verifier]:
        return {
            name: Verifier(
                issuer_url=issuer.url,
                audience=settings.audience,
                algorithms=issuer.algorithms,
                leeway=settings.leeway,
                clock=self.clock,
            )
            for name, issuer in settings.issuers.items()
        }

    def reconfigure(
        self, settings: Settings, signer: Signer | None = None, publishers: Publishers | None = None
    ) -> None:
        """Switch to new settings at once: everything is built first, then swapped without an await between."""
        publishers = publishers or Publishers(settings.publishers)
        verifiers = self._verifiers(settings)
        self.keys.reconfigure(settings.issuers, timeout=settings.fetch_timeout, max_bytes=settings.fetch_max_bytes)
        self.keys.ttl, self.keys.cooldown = settings.keys_ttl, settings.refresh_cooldown
        self.keys.max_age = settings.keys_max_age
        self.settings, self.publishers, self.verifiers = settings, publishers, verifiers
        if signer is not None:
            self.signer = signer

    async def verify(self, raw: str, attempt: Attempt | None = None) -> Verified:
        attempt = attempt if attempt is not None else Attempt()
        token = peek(raw)
        issuer = self.settings.by_url.get(token.issuer)
        if issuer is None:
            # Exact match only, and no network I/O: an attacker's `iss` never becomes a URL we fetch.
            raise InvalidPayload(f"issuer {token.issuer[:200]!r} is not trusted by this gateway")
        attempt.issuer = issuer.name
        if not issuer.enabled:
            raise InvalidPayload(f"issuer {issuer.name!r} is suspended by this gateway's operator")
        verifier = self.verifiers[issuer.name]
        verifier.check_algorithm(token)
        key = await self.keys.key(issuer.name, token.kid)
        claims = verifier.verify(token, key)
        # Keyed by the issuer's URL (what signed it), not its config name, so renaming an issuer in a reload
        # cannot make spent tokens new again.
        attempt.jti = jti_key(issuer.url, claims["jti"])
        identity = KINDS[issuer.kind].identity(issuer, claims)
        attempt.identity = identity
        check_policy(issuer, identity)
        return Verified(issuer=issuer, claims=claims, identity=identity)

    def match(self, verified: Verified) -> Match:
        kind = KINDS[verified.issuer.kind]
        return self.publishers.match(verified.identity, environment_case_sensitive=kind.environment_case_sensitive)

    async def exchange(self, raw: str, attempt: Attempt | None = None) -> Exchanged:
        attempt = attempt if attempt is not None else Attempt()
        verified = await self.verify(raw, attempt)
        if self.limits is not None:
            # Counted for every verified attempt, matched or not: a repository cannot probe publishers freely.
            await self.limits.hit_repository(verified.issuer.name, verified.identity.repository)
        match = self.match(verified)
        attempt.publishers, attempt.projects = match.publishers, match.projects
        now = self.clock()
        # Remember the jti for as long as any clock within the leeway could still accept the token.
        ttl = max(1.0, verified.claims["exp"] + self.settings.leeway - now + 1)
        if not await self.store.spend(jti_key(verified.issuer.url, verified.claims["jti"]), ttl):
            raise ReusedToken("this ID token was already exchanged; each ID token can be used once")
        minted = self.signer.mint(
            identity=verified.identity,
            projects=match.projects,
            issuer=self.settings.url,
            audience=self.settings.audience,
            ttl=self.settings.token_ttl,
            now=now,
        )
        return Exchanged(verified=verified, match=match, minted=minted)


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
            f"the job ran on a {identity.runner_environment or 'unknown'!s} runner; issuer {issuer.name!r} only "
            f"publishes from {', '.join(issuer.runner_environments)} runners"
        )
