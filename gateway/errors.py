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
     +-- UploadError           the /legacy/ upload proxy's refusals, answered as one plain-text line (twine
          |                    shows the body with --verbose), never the JSON shape of mint-token
          +-- InvalidUpload             400 invalid-upload   the form, its fields or its files (gateway.multipart)
          |    +-- UploadTooLarge       413 upload-too-large
          +-- UploadUnauthenticated     401 invalid-credentials  no Basic credentials (WWW-Authenticate)
          +-- UploadForbidden           403 upload-forbidden     the token is not valid, or not for this project
          +-- NoUpstream                404 no-upstream          no [upstream] configured
          +-- UploadsBusy               503 uploads-busy         max_concurrent_uploads in progress (Retry-After)
          +-- RevocationsUnavailable    503 revocations-unavailable  revocations cannot be read (gateway.state)
          +-- UpstreamError             502 upstream-unavailable the index cannot be reached or answers oddly
          |    +-- UpstreamTimeout      504 upstream-timeout
          |    +-- UpstreamCredentials  502 upstream-credentials-refused  the operator's index login was refused
          +-- UpstreamRefused           (the index's status) upstream-refused  the index's own refusal, as text

    ConfigError(problems)   a config that must not be served; one line per problem

`description` is shown to the client, so it never carries token contents beyond the claim values the client
itself sent, and never anything about other repositories' publishers.
"""

from __future__ import annotations

from collections.abc import Sequence


class GatewayError(Exception):
    code = "invalid-payload"
    status = 422
    # Seconds a client should wait before trying again; answered as Retry-After when set.
    retry_after: int | None = None

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


class UploadError(GatewayError):
    code = "invalid-upload"
    status = 400


class InvalidUpload(UploadError):
    pass


class UploadTooLarge(InvalidUpload):
    code = "upload-too-large"
    status = 413


class UploadUnauthenticated(UploadError):
    code = "invalid-credentials"
    status = 401


class UploadForbidden(UploadError):
    code = "upload-forbidden"
    status = 403


class NoUpstream(UploadError):
    code = "no-upstream"
    status = 404


class UploadsBusy(UploadError):
    code = "uploads-busy"
    status = 503

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class RevocationsUnavailable(UploadError):
    code = "revocations-unavailable"
    status = 503


class UpstreamError(UploadError):
    code = "upstream-unavailable"
    status = 502


class UpstreamTimeout(UpstreamError):
    code = "upstream-timeout"
    status = 504


class UpstreamCredentials(UpstreamError):
    code = "upstream-credentials-refused"


class UpstreamRefused(UploadError):
    """The upstream index's own refusal (409 exists, 400 invalid file, ...), its status kept, its text cleaned."""

    code = "upstream-refused"

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status


class ConfigError(Exception):
    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)
