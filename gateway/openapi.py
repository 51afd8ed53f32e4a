"""The OpenAPI 3.1 document of the /v1/ API, served at /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from gateway.schemas import REQUESTS

_ERR = {"$ref": "#/components/responses/Error"}
_STD = {"400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "429": _ERR, "500": _ERR, "503": _ERR}


def _op(summary: str, ok: str = "200", body: str | None = None, params: list[str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            **_STD,
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if params:
        op["parameters"] = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in params]
    return op


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


# Each summary names the permission the caller's effective permissions in that org must grant (CONTRACT
# section 7); "(admins)" means the caller's effective role there must also be admin or above.
_PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/keys/verify": {
        "post": {**_op("Verify a key in-process (no authentication)", body="VerifyRequest"), "security": []}
    },
    "/v1/me": {"get": _op("The calling key, its owner and the orgs it can act in")},
    "/v1/keys": {
        "post": _op("Create a key for the caller, never more powerful than the caller's key", "201", "KeyCreate"),
        "get": _op(
            "List keys: the caller's own, or with org= every key acting in that org (keys:read, admins)",
            params=["org", "owner", "status", "limit", "cursor"],
        ),
    },
    "/v1/keys/{key_id}": {
        "get": _op("A key: one's own, or as seen from the orgs where the caller has keys:read (admins)")
    },
    "/v1/keys/{key_id}/revoke": {
        "post": _op("Revoke one's own key; an admin with keys:write stops another's key in their orgs only")
    },
    "/v1/keys/{key_id}/rotate": {
        "post": _op("A new key with the same settings; the old one expires after grace", "201", "Rotate")
    },
    "/v1/orgs": {
        "post": _op("Create an org (orgs:write, an all-orgs key); the caller becomes its owner", "201", "Named"),
        "get": _op("The orgs the calling key can act in"),
    },
    "/v1/orgs/{org}": {"get": _op("An org")},
    "/v1/orgs/{org}/members": {
        "get": _op("Members (members:read, admins)"),
        "post": _op(
            "Invite a user by email; a current member's role is set (members:write, admins)", "202", "MemberAdd"
        ),
    },
    "/v1/orgs/{org}/members/{user_id}": {
        "put": _op("Change a member's role (members:write, admins)", body="Role"),
        "delete": _op("Remove a member (members:write, admins)"),
    },
    "/v1/orgs/{org}/invitations": {"get": _op("The org's open invitations (members:read, admins)")},
    "/v1/orgs/{org}/invitations/{invitation}": {"delete": _op("Withdraw an open invitation (members:write, admins)")},
    "/v1/invitations": {"get": _op("The caller's own open invitations")},
    "/v1/invitations/{invitation}/accept": {"post": _op("Accept one's invitation (an all-orgs key or the web page)")},
    "/v1/invitations/{invitation}/decline": {"post": _op("Decline one's invitation")},
    "/v1/orgs/{org}/projects": {
        "post": _op("Create a project (projects:write, admins)", "201", "Named"),
        "get": _op("Projects (projects:read)"),
    },
    "/v1/orgs/{org}/projects/{project}": {
        "get": _op("A project (projects:read)"),
        "delete": _op(
            "Delete a project (projects:write, admins); refused while keys name it unless revoke_keys=true",
            params=["revoke_keys"],
        ),
    },
    "/v1/orgs/{org}/service-accounts": {
        "post": _op("Create a service account (service_accounts:write, admins)", "201", "MemberRole"),
        "get": _op("Service accounts (service_accounts:read, admins)"),
    },
    "/v1/orgs/{org}/service-accounts/{sa}/keys": {
        "post": _op(
            "Issue a key owned by the org's service account (service_accounts:write, admins)", "201", "KeyCreate"
        )
    },
    "/v1/orgs/{org}/audit": {
        "get": _op(
            "Audit events, newest first (audit:read, admins)",
            params=["type", "key_id", "actor", "since", "until", "limit", "cursor"],
        )
    },
}

# Request bodies: the models `/v1/` validates with (gateway.schemas), so the two cannot drift apart.
_SCHEMAS: dict[str, Any] = {
    m.__name__: m.model_json_schema(ref_template="#/components/schemas/{model}") for m in REQUESTS
} | {
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
    ("/v1/keys/{key_id}/rotate", "post"): "rotate_key",
    ("/v1/me", "get"): "me",
    ("/v1/orgs", "get"): "list_orgs",
    ("/v1/orgs", "post"): "create_org",
    ("/v1/orgs/{org}", "get"): "get_org",
    ("/v1/orgs/{org}/audit", "get"): "audit",
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
                "Error": {
                    "description": "The contract's error body",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }
