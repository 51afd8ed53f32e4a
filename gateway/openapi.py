"""The OpenAPI 3.1 document of the /v1/ API, served at /v1/openapi.json.

Request bodies and 2xx response bodies are the JSON Schemas of the models the API is built on
(`gateway.schemas`, `gateway.responses`); each operation lists the statuses its handler answers."""

from __future__ import annotations

from typing import Any

from gateway.responses import (
    RESPONSES,
    Answer,
    AuditPage,
    Ended,
    Invitation,
    InvitationList,
    IssuedSession,
    Key,
    KeyPage,
    KeyUsage,
    Me,
    MemberList,
    Membership,
    MembershipChanged,
    MembershipRemoved,
    NewKey,
    Org,
    OrgList,
    OrgWithRole,
    Project,
    ProjectDeleted,
    ProjectList,
    Revoked,
    RevokedKey,
    RotatedKey,
    ServiceAccount,
    ServiceAccountList,
    SessionList,
    SwitchedSession,
    TokenPair,
    Verdict,
)
from gateway.schemas import EVENT_TYPE_PATTERN, ID_PATTERN, REQUESTS

_REF = "#/components/schemas/{model}"
_ID = {"type": "string", "pattern": ID_PATTERN}  # anything else is refused with 400
_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}  # gateway.api.page, MAX_PAGE

# What every authenticated call may be answered besides its success: a bad request or credential (400,
# 401), a refusal (403), the rate limit (429), a bug (500) and an outage (503).
_AUTHED = (400, 401, 403, 429, 500, 503)
# A body arrives within server.body_timeout_s (else 408) and within the app's client_max_size (else 413).
_BODY_ERRORS = (408, 413)
_ERROR_TEXT = {
    400: "invalid_request (the field at fault in error.field)",
    401: "No valid credential",
    403: "Not allowed",
    404: "Nothing there, or nothing the caller may see (another org's ids answer the same)",
    408: "The body did not arrive in time",
    409: "conflict: the change contradicts the current state",
    413: "The body is too large",
    429: "rate_limited, with Retry-After",
    500: "internal_error: a bug, logged under the request id in X-Request-Id",
    503: "auth_unavailable: a backing store is down",
}


def _op(
    summary: str,
    answers: dict[int, type[Answer]],
    *,
    body: str | None = None,
    body_required: bool = True,
    errors: tuple[int, ...] = (),
    query: dict[str, dict[str, Any]] | None = None,
    authed: bool = True,
) -> dict[str, Any]:
    """An operation answered with `answers` (status: response model) and errors: those of every
    authenticated call (`authed`), those of a request body, and `errors`."""
    statuses = set(errors) | (set(_AUTHED) if authed else {400, 500, 503}) | (set(_BODY_ERRORS) if body else set())
    responses: dict[str, Any] = {
        str(status): {
            "description": _first_sentence(model),
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
        for status, model in answers.items()
    }
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=body)}}},
        }
    if query:
        op["parameters"] = [{"name": n, "in": "query", "required": False, "schema": s} for n, s in query.items()]
    if not authed:
        op["security"] = []
    return op


def _first_sentence(model: type[Answer]) -> str:
    return " ".join((model.__doc__ or model.__name__).split()).split(". ")[0].rstrip(".")


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": _ID} for n in names]


_NOT_FOUND = (404,)
_CONFLICT = (404, 409)

# Each summary names the permission the caller's effective permissions in that org must grant (CONTRACT
# section 7); "(admins)" means the caller's effective role there must also be admin or above.
_PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/keys/verify": {
        "post": _op(
            "Verify a key in-process (no authentication): a refused key is a verdict too, answered 200",
            {200: Verdict},
            body="VerifyRequest",
            authed=False,
        )
    },
    "/v1/me": {"get": _op("The calling key, its owner and the orgs it can act in", {200: Me})},
    "/v1/keys": {
        "post": _op(
            "Create a key for the caller, never more powerful than the caller's key",
            {201: NewKey},
            body="KeyCreate",
            errors=_NOT_FOUND,
        ),
        "get": _op(
            "List keys, oldest first: the caller's own, or with org= every key acting in that org (keys:read, admins)",
            {200: KeyPage},
            errors=_NOT_FOUND,
            query={
                "org": _ID,
                "owner": {**_ID, "description": "A user id: with org=, that member's keys in the org"},
                "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
                "q": {
                    "type": "string",
                    "maxLength": 200,
                    "description": "Only keys whose name (in any case) or id contains this text",
                },
                "expires_before": {**_TIME, "description": "Only keys expiring before this time"},
                "limit": _LIMIT,
                "cursor": _STRING,
            },
        ),
    },
    "/v1/keys/{key_id}": {
        "get": _op(
            "A key: one's own, or as seen from the orgs where the caller has keys:read (admins)",
            {200: Key},
            errors=_NOT_FOUND,
        )
    },
    "/v1/keys/{key_id}/usage": {
        "get": _op(
            "A key's requests per UTC day over the last days (default 30), as GET /v1/keys/{key_id} sees the key",
            {200: KeyUsage},
            errors=_NOT_FOUND,
            query={"days": {"type": "integer", "minimum": 1, "maximum": 90, "default": 30}},
        )
    },
    "/v1/keys/{key_id}/revoke": {
        "post": _op(
            "Revoke one's own key; an admin with keys:write stops another's key in their orgs only",
            {200: RevokedKey},
            errors=_NOT_FOUND,
        )
    },
    "/v1/keys/{key_id}/rotate": {
        "post": _op(
            "A new key with the same settings; the old one expires after grace (409 unless it is active)",
            {201: RotatedKey},
            body="Rotate",
            body_required=False,
            errors=_CONFLICT,
        )
    },
    "/v1/orgs": {
        "post": _op(
            "Create an org (orgs:write, an all-orgs key); the caller becomes its owner", {201: Org}, body="Named"
        ),
        "get": _op("The orgs the calling key can act in", {200: OrgList}),
    },
    "/v1/orgs/{org}": {"get": _op("An org", {200: OrgWithRole}, errors=_NOT_FOUND)},
    "/v1/orgs/{org}/members": {
        "get": _op("Members (members:read, admins)", {200: MemberList}, errors=_NOT_FOUND),
        "post": _op(
            "Invite a user by email (202, an invitation); a current member's role is set at once (200)"
            " (members:write, admins)",
            {200: MembershipChanged, 202: Invitation},
            body="MemberAdd",
            errors=_CONFLICT,
        ),
    },
    "/v1/orgs/{org}/members/{user_id}": {
        "put": _op("Change a member's role (members:write, admins)", {200: Membership}, body="Role", errors=_CONFLICT),
        "delete": _op("Remove a member (members:write, admins)", {200: MembershipRemoved}, errors=_CONFLICT),
    },
    "/v1/orgs/{org}/invitations": {
        "get": _op("The org's open invitations (members:read, admins)", {200: InvitationList}, errors=_NOT_FOUND)
    },
    "/v1/orgs/{org}/invitations/{invitation}": {
        "delete": _op("Withdraw an open invitation (members:write, admins)", {200: Invitation}, errors=_CONFLICT)
    },
    "/v1/invitations": {"get": _op("The caller's own open invitations", {200: InvitationList})},
    "/v1/invitations/{invitation}/accept": {
        "post": _op("Accept one's invitation (an all-orgs key or the web page)", {200: Invitation}, errors=_CONFLICT)
    },
    "/v1/invitations/{invitation}/decline": {
        "post": _op("Decline one's invitation", {200: Invitation}, errors=_CONFLICT)
    },
    "/v1/orgs/{org}/projects": {
        "post": _op(
            "Create a project (projects:write, admins); 409 if the org has one of that name",
            {201: Project},
            body="Named",
            errors=_CONFLICT,
        ),
        "get": _op("Projects (projects:read)", {200: ProjectList}, errors=_NOT_FOUND),
    },
    "/v1/orgs/{org}/projects/{project}": {
        "get": _op("A project (projects:read)", {200: Project}, errors=_NOT_FOUND),
        "delete": _op(
            "Delete a project (projects:write, admins); refused (409) while keys name it unless revoke_keys=true",
            {200: ProjectDeleted},
            errors=_CONFLICT,
            query={"revoke_keys": {"type": "boolean", "default": False}},
        ),
    },
    "/v1/orgs/{org}/service-accounts": {
        "post": _op(
            "Create a service account (service_accounts:write, admins)",
            {201: ServiceAccount},
            body="MemberRole",
            errors=_NOT_FOUND,
        ),
        "get": _op("Service accounts (service_accounts:read, admins)", {200: ServiceAccountList}, errors=_NOT_FOUND),
    },
    "/v1/orgs/{org}/service-accounts/{sa}/keys": {
        "post": _op(
            "Issue a key owned by the org's service account (service_accounts:write, admins)",
            {201: NewKey},
            body="KeyCreate",
            errors=_NOT_FOUND,
        )
    },
    "/v1/sessions": {
        "post": _op(
            "A session for a member of the calling service account's org (sessions:issue): its cookie, to set",
            {201: IssuedSession},
            body="SessionCreate",
            errors=_NOT_FOUND,
        ),
        "get": _op("The caller's user's live sessions", {200: SessionList}),
        "delete": _op("Sign out everywhere: every session of the caller's user, and every token family", {200: Ended}),
    },
    "/v1/sessions/{session_id}": {"delete": _op("End one of the caller's sessions", {200: Ended}, errors=_NOT_FOUND)},
    "/v1/session": {"delete": _op("End the calling session (the cookie's)", {200: Ended})},
    "/v1/session/org": {
        "post": _op("Switch the calling session's active org", {200: SwitchedSession}, body="OrgSwitch")
    },
    "/v1/tokens": {
        "post": _op(
            "An access token and refresh token: for the session's user and org, for the caller's own key (capped"
            " by it), or by a service account (tokens:issue) for a member of its org",
            {200: TokenPair},
            body="TokenCreate",
            body_required=False,
            errors=_NOT_FOUND,
        )
    },
    "/v1/tokens/refresh": {
        "post": _op(
            "Spend a refresh token for a new pair (single use: an already-used one revokes its family)",
            {200: TokenPair},
            body="TokenRefresh",
            errors=(401, 403, 404, 429),
            authed=False,
        )
    },
    "/v1/tokens/revoke": {
        "post": _op(
            "RFC 7009: revoke the family of a refresh or access token (200 whether or not it was valid)",
            {200: Revoked},
            body="TokenRevoke",
            errors=(429,),
            authed=False,
        )
    },
    "/v1/orgs/{org}/audit": {
        "get": _op(
            "Audit events, newest first (audit:read, admins)",
            {200: AuditPage},
            errors=_NOT_FOUND,
            query={
                "type": {"type": "string", "pattern": EVENT_TYPE_PATTERN},
                "key_id": _ID,
                "actor": {**_ID, "description": "A user id, or cli for the operator"},
                "since": _TIME,
                "until": _TIME,
                "limit": _LIMIT,
                "cursor": _STRING,
            },
        )
    },
}


def _components() -> dict[str, Any]:
    """Every model's schema under components/schemas, the models it nests ($defs) hoisted beside it (its
    refs point there already): requests as they are validated, responses as they are written."""
    schemas: dict[str, Any] = {}
    generated = [(m, m.model_json_schema(ref_template=_REF)) for m in REQUESTS] + [
        (m, m.model_json_schema(ref_template=_REF, mode="serialization")) for m in RESPONSES
    ]
    for model, schema in generated:
        for name, nested in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if schemas.setdefault(name, nested) != nested:
                raise RuntimeError(f"two different schemas are both named {name}")  # pragma: no cover
    return schemas


_SCHEMAS: dict[str, Any] = _components() | {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}},
            }
        },
    },
}


# Each operation's id is the name of the handler that serves it (gateway.api), for code generators.
_OPERATION_IDS: dict[tuple[str, str], str] = {
    ("/v1/invitations", "get"): "my_invitations",
    ("/v1/invitations/{invitation}/accept", "post"): "accept_invitation",
    ("/v1/invitations/{invitation}/decline", "post"): "decline_invitation",
    ("/v1/keys", "get"): "list_keys",
    ("/v1/keys", "post"): "create_key",
    ("/v1/keys/verify", "post"): "keys_verify",
    ("/v1/keys/{key_id}", "get"): "get_key",
    ("/v1/keys/{key_id}/revoke", "post"): "revoke_key",
    ("/v1/keys/{key_id}/usage", "get"): "key_usage",
    ("/v1/keys/{key_id}/rotate", "post"): "rotate_key",
    ("/v1/me", "get"): "me",
    ("/v1/orgs", "get"): "list_orgs",
    ("/v1/orgs", "post"): "create_org",
    ("/v1/orgs/{org}", "get"): "get_org",
    ("/v1/orgs/{org}/audit", "get"): "audit",
    ("/v1/sessions", "post"): "create_session",
    ("/v1/sessions", "get"): "my_sessions",
    ("/v1/sessions", "delete"): "end_my_sessions",
    ("/v1/sessions/{session_id}", "delete"): "end_my_session",
    ("/v1/session", "delete"): "end_session",
    ("/v1/session/org", "post"): "switch_org",
    ("/v1/tokens", "post"): "create_token",
    ("/v1/tokens/refresh", "post"): "refresh_token",
    ("/v1/tokens/revoke", "post"): "revoke_token",
    ("/v1/orgs/{org}/invitations", "get"): "list_org_invitations",
    ("/v1/orgs/{org}/invitations/{invitation}", "delete"): "withdraw_invitation",
    ("/v1/orgs/{org}/members", "get"): "list_members",
    ("/v1/orgs/{org}/members", "post"): "add_member",
    ("/v1/orgs/{org}/members/{user_id}", "delete"): "remove_member",
    ("/v1/orgs/{org}/members/{user_id}", "put"): "set_member",
    ("/v1/orgs/{org}/projects", "get"): "list_projects",
    ("/v1/orgs/{org}/projects", "post"): "create_project",
    ("/v1/orgs/{org}/projects/{project}", "delete"): "delete_project",
    ("/v1/orgs/{org}/projects/{project}", "get"): "get_project",
    ("/v1/orgs/{org}/service-accounts", "get"): "list_service_accounts",
    ("/v1/orgs/{org}/service-accounts", "post"): "create_service_account",
    ("/v1/orgs/{org}/service-accounts/{sa}/keys", "post"): "create_service_account_key",
}


def openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, ops in _PATHS.items():
        item: dict[str, Any] = {
            method: {"operationId": _OPERATION_IDS[path, method], **op} for method, op in ops.items()
        }
        if "{" in path:
            item["parameters"] = _path_params(path)
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway management API", "version": "1"},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": _SCHEMAS,
            "responses": {
                f"Error{status}": {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for status, text in _ERROR_TEXT.items()
            },
        },
    }
