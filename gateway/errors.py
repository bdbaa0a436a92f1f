"""Every failure a client can see, and the one exception config loading raises.

    GatewayError(code, description, status)      -> the contract's error body
     +-- InvalidPayload        422 invalid-payload
     |    +-- PayloadTooLarge  413 invalid-payload
     +-- InvalidToken          422 invalid-token
     +-- ReusedToken           422 invalid-reuse-token
     +-- InvalidPublisher      422 invalid-publisher
     +-- RateLimited           429 rate-limited
     +-- IssuerUnavailable     503 issuer-unavailable
     +-- ReplayStoreUnavailable 503 replay-store-unavailable
     +-- InternalError         500 internal-error (a bug: an unexpected exception, never an input's fault)

    ConfigError(problems)   a config that must not be served; one line per problem

`description` is shown to the client, so it never carries token contents beyond the claim values the client
itself sent, and never anything about other repositories' publishers.
"""

from __future__ import annotations

from collections.abc import Sequence


class GatewayError(Exception):
    code = "invalid-payload"
    status = 422

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class InvalidPayload(GatewayError):
    code = "invalid-payload"


class PayloadTooLarge(InvalidPayload):
    status = 413


class InvalidToken(GatewayError):
    code = "invalid-token"


class ReusedToken(GatewayError):
    code = "invalid-reuse-token"


class InvalidPublisher(GatewayError):
    code = "invalid-publisher"


class RateLimited(GatewayError):
    code = "rate-limited"
    status = 429

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class IssuerUnavailable(GatewayError):
    code = "issuer-unavailable"
    status = 503


class ReplayStoreUnavailable(GatewayError):
    code = "replay-store-unavailable"
    status = 503


class InternalError(GatewayError):
    code = "internal-error"
    status = 500


class ConfigError(Exception):
    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)
