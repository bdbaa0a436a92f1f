"""The token exchange: verify an ID token, match it to publishers, spend its jti, mint an upload token.

The order is the security argument. The unverified `iss` only picks a verifier; an algorithm the issuer does
not use is refused before any network I/O; the signature is checked before any claim is believed; the jti is
spent only once a publisher matched (so a token refused for a fixable reason stays usable) and before minting
(so two concurrent requests with one token cannot both mint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .config import Issuer, Settings
from .errors import GatewayError, InvalidPayload, InvalidPublisher, ReusedToken
from .identity import Identity
from .issuers import KINDS
from .jose import VerifiedClaims, Verifier, peek
from .keys import Keys
from .mint import Minted, Signer
from .publishers import Match, Publishers, under_namespaces
from .store import Store, jti_key


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
    ) -> None:
        self.keys = keys
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

    async def verify(self, raw: str) -> Verified:
        token = peek(raw)
        issuer = self.settings.by_url.get(token.issuer)
        if issuer is None:
            # Exact match only, and no network I/O: an attacker's `iss` never becomes a URL we fetch.
            raise InvalidPayload(f"issuer {token.issuer[:200]!r} is not trusted by this gateway")
        with _attributed(issuer.name):
            if not issuer.enabled:
                raise InvalidPayload(f"issuer {issuer.name!r} is suspended by this gateway's operator")
            verifier = self.verifiers[issuer.name]
            verifier.check_algorithm(token)
            key = await self.keys.key(issuer.name, token.kid)
            claims = verifier.verify(token, key)
            identity = KINDS[issuer.kind].identity(issuer, claims)
            check_policy(issuer, identity)
        return Verified(issuer=issuer, claims=claims, identity=identity)

    def match(self, verified: Verified) -> Match:
        kind = KINDS[verified.issuer.kind]
        with _attributed(verified.issuer.name):
            return self.publishers.match(
                verified.identity, environment_case_sensitive=kind.environment_case_sensitive
            )

    async def exchange(self, raw: str) -> Exchanged:
        verified = await self.verify(raw)
        match = self.match(verified)
        now = self.clock()
        # Remember the jti for as long as any clock within the leeway could still accept the token.
        ttl = max(1.0, verified.claims["exp"] + self.settings.leeway - now + 1)
        with _attributed(verified.issuer.name):
            if not await self.store.spend(jti_key(verified.issuer.name, verified.claims["jti"]), ttl):
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


@contextmanager
def _attributed(issuer: str) -> Iterator[None]:
    try:
        yield
    except GatewayError as e:
        e.issuer = issuer
        raise
