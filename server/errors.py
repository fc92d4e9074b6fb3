"""The exceptions the service raises on purpose. The API maps each to an OpenAI-shaped JSON error in
one place (status, `type`, `param`, `code`); anything else is a bug and becomes a 500."""

from __future__ import annotations


class MemdecError(Exception):
    status_code = 500
    error_type = "internal_error"
    retry_after: int | None = None  # seconds; the API sends it as `Retry-After` (a class may set a default)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidRequestError(MemdecError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(MemdecError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(MemdecError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(MemdecError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(MemdecError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(MemdecError):
    status_code = 413
    error_type = "invalid_request_error"


class QueueFullError(MemdecError):
    status_code = 429
    error_type = "rate_limit_error"
    retry_after = 1


class ServiceUnavailableError(MemdecError):
    status_code = 503
    error_type = "service_unavailable"


class MemoryLoadError(InvalidRequestError):
    """A memory could not be loaded: bad directory, manifest, weights format or tokenizer."""


class EngineDeadError(ServiceUnavailableError):
    """The engine loop has stopped; nothing can be served. `reason`: what stopped it (an exception is named
    with its type), when known."""

    def __init__(self, reason: BaseException | str | None = None) -> None:
        if isinstance(reason, EngineDeadError):  # passed on (a caller told after the loop died): as it was
            message = reason.message
        else:
            if isinstance(reason, BaseException):
                reason = f"{type(reason).__name__}: {reason}"
            message = "the engine has stopped" + (f": {reason}" if reason else "")
        super().__init__(message, code="engine_dead")


class StartupFailedError(ServiceUnavailableError):
    """The server could not load what it was asked to serve; every request and /health say why."""

    def __init__(self, error: str | None) -> None:
        super().__init__(f"the server failed to start: {error}", code="startup_failed")


def forward_failed(model: str, exc: BaseException) -> str:
    """What a request learns when a model's forward for it raised (`model`: "base" or "memory"); the engine
    and the runner both fail rows with it, so the text is written here once."""
    return f"{model} forward failed: {type(exc).__name__}: {exc}"
