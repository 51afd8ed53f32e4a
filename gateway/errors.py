"""One exception hierarchy carrying the contract's error code and HTTP status."""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base error: `code` and `status` are what clients see; the message is for humans."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str = "", *, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")
        self.field = field
        self.headers = headers or {}  # extra response headers, such as Retry-After


class InvalidRequest(GatewayError):
    code = "invalid_request"
    status = 400


class Unauthenticated(GatewayError):
    status = 401


class MissingCredentials(Unauthenticated):
    code = "missing_credentials"


class InvalidApiKey(Unauthenticated):
    code = "invalid_api_key"

    def __init__(self, message: str = "", *, unknown_key: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        # No key has this id: the id is the caller's invention, so a failure is audited by address alone.
        self.unknown_key = unknown_key


class ExpiredApiKey(Unauthenticated):
    code = "expired_api_key"


class RevokedApiKey(Unauthenticated):
    code = "revoked_api_key"


class InvalidToken(Unauthenticated):
    """A bearer token that is not a valid access token (or a refresh token that is not valid)."""

    code = "invalid_token"


class ExpiredToken(Unauthenticated):
    code = "expired_token"


class Forbidden(GatewayError):
    status = 403


class InsufficientPermissions(Forbidden):
    code = "insufficient_permissions"


class OrgRequired(Forbidden):
    code = "org_required"


class OrgNotAllowed(Forbidden):
    code = "org_not_allowed"


class ProjectNotAllowed(Forbidden):
    code = "project_not_allowed"


class IpNotAllowed(Forbidden):
    code = "ip_not_allowed"


class RouteNotAllowed(Forbidden):
    code = "route_not_allowed"


class CsrfFailed(Forbidden):
    """A cookie-only request with an unsafe method from a page not allowed to send it."""

    code = "csrf_failed"


class RequestTimeout(GatewayError):
    """The request body did not arrive within `server.body_timeout_s`."""

    code = "request_timeout"
    status = 408


class RateLimited(GatewayError):
    code = "rate_limited"
    status = 429


class AuthUnavailable(GatewayError):
    """A backing store is down and nothing usable is cached: never reported as a bad key."""

    code = "auth_unavailable"
    status = 503


class InternalError(GatewayError):
    """A bug: answered 500 with the request id it was logged under, never disguised as an outage."""

    code = "internal_error"
    status = 500

    def __init__(self, request_id: str) -> None:
        # The answer's X-Request-Id header says it too: every answer carries its request's id.
        super().__init__(f"internal error (request id {request_id})")
        self.request_id = request_id


class NotFound(GatewayError):
    code = "not_found"
    status = 404


class Conflict(GatewayError):
    code = "conflict"
    status = 409


class ConfigError(Exception):
    """A bad configuration file or value; the message names the field."""
