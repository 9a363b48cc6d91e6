"""What can go wrong with a request, as domain errors: no HTTP here.

Every layer raises these; one place, the HTTP edge (``router.http``), turns each kind into a status and an
OpenAI-shaped error body. ``message`` is what the client reads; ``param`` names the offending field or header;
``code`` is a stable machine-readable word.
"""

from __future__ import annotations


class RouterError(Exception):
    """A request the gateway refuses or cannot complete."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}  # what the answer must also carry (e.g. the request id of a failed request)


class InvalidRequest(RouterError):
    """The request is malformed or asks for something that cannot be done."""


class AuthenticationFailed(RouterError):
    """No valid API key."""


class PermissionDenied(RouterError):
    """The key may not do this (a backend, an extra, the threshold header)."""


class NotFound(RouterError):
    """The model, answer or other thing named does not exist (or belongs to another key)."""


class TooLarge(RouterError):
    """The request body is larger than the gateway accepts."""


class RateLimited(RouterError):
    """The key (or the client's address) must wait ``retry_after_s`` seconds (None: waiting will not help)."""

    def __init__(self, message: str, *, retry_after_s: float | None, code: str = "rate_limit_exceeded") -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class UpstreamFailed(RouterError):
    """No backend could answer."""


class Unavailable(RouterError):
    """The gateway cannot serve this right now (starting, stopping, a dependency down)."""


class HTTPRefusal(RouterError):
    """A refusal that only exists at the HTTP level (a status with no domain meaning, e.g. 405 or 431); raised
    by the edge itself."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
