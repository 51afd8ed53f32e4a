"""The `/v1/` request bodies, defined once: `read` validates a body with them, and `gateway.openapi`
documents them (their JSON Schema). pydantic, strict (no coercion) and closed (an unknown field is refused).

Every field may be sent as null, meaning absent, as before; a required one must be present and not null.
The checks that need the caller (which orgs, which role) stay with the handlers."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from gateway.errors import InvalidRequest
from gateway.formats import ID_RE, MAX_NAME

# What a request names, besides its body: an id (in a path, in `org=`, in a key's orgs and projects; the
# grammar of gateway.formats.ID_RE, which checked_id applies) and an audit event's type (`api_key.created`,
# `auth.failed.dropped`).
ID_PATTERN = f"^{ID_RE.pattern}$"
EVENT_TYPE_PATTERN = "^[a-z0-9_.]{1,64}$"
EVENT_TYPE_RE = re.compile(EVENT_TYPE_PATTERN)

_LIST = {"type": "array", "items": {"type": "string"}, "maxItems": 100}
# An empty list is refused (it is not "all"), and each item is an id.
_ALL_OR_LIST = {
    "oneOf": [{"const": "all"}, {**_LIST, "items": {"type": "string", "pattern": ID_PATTERN}, "minItems": 1}]
}
# Lists are checked by the handlers (their message names the bound); the schema says what is accepted.
StrList = Annotated[list[Any], WithJsonSchema(_LIST)]
AllOrList = Annotated[str | list[Any], WithJsonSchema(_ALL_OR_LIST)]
# A name is trimmed, then 1 to MAX_NAME printable characters (gateway.formats.valid_name).
_NAME: dict[str, Any] = {"minLength": 1, "maxLength": MAX_NAME}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    required: ClassVar[tuple[str, ...]] = ()
    nulls_refused: ClassVar[bool] = False  # a null is a wrong type here, not an absent field

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema of what `read` accepts: a required field (and with `nulls_refused`, any field) is
        not null there, though the model itself accepts null so that `read` can name the field."""
        schema = super().model_json_schema(*args, **kwargs)
        if cls.required:
            schema["required"] = list(cls.required)
        for name in schema["properties"] if cls.nulls_refused else cls.required:
            _not_null(schema["properties"][name])
        return schema


def _not_null(prop: dict[str, Any]) -> None:
    branches = [b for b in prop.pop("anyOf") if b != {"type": "null"}]
    prop.pop("default", None)
    if len(branches) == 1:
        prop.update(branches[0])
    else:  # pragma: no cover - every field is one type or null
        prop["anyOf"] = branches


class KeyCreate(Body):
    required = ("name", "role")
    name: str | None = Field(None, json_schema_extra=_NAME, examples=["ci"])
    role: str | None = Field(None, examples=["member"])
    env: str | None = Field(None, json_schema_extra={"enum": ["live", "test", None]})
    scopes: StrList | None = None
    orgs: AllOrList | None = None
    projects: AllOrList | None = None
    expires_in: str | None = Field(None, examples=["30d"])
    expires_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    allowed_ips: StrList | None = None
    rate_limit: str | None = Field(None, examples=["100/1m"])


class Rotate(Body):
    grace: str | None = Field(None, examples=["1h"])


class Named(Body):
    required = ("name",)
    name: str | None = Field(None, json_schema_extra=_NAME, examples=["web"])


class Role(Body):
    required = ("role",)
    role: str | None = Field(None, examples=["member"])


class MemberAdd(Body):
    required = ("email", "role")
    email: str | None = Field(None, json_schema_extra={"format": "email"}, examples=["dev@example.com"])
    role: str | None = Field(None, examples=["member"])


class MemberRole(Body):
    required = ("name", "role")
    name: str | None = Field(None, json_schema_extra=_NAME, examples=["ci"])
    role: str | None = Field(None, examples=["member"])


class VerifyRequest(Body):
    """`POST /v1/keys/verify`: here a field sent is a string (null is refused, not taken as absent)."""

    required = ("key",)
    nulls_refused = True
    key: str | None = None
    org: str | None = None
    permission: str | None = None
    method: str | None = Field(None, examples=["GET"])
    path: str | None = Field(None, examples=["/v1/orgs/org_x/things"])


class SessionCreate(Body):
    """`POST /v1/sessions`: a session for a member of the calling service account's org."""

    required = ("user", "org")
    user: str | None = Field(None, json_schema_extra={"pattern": ID_PATTERN})
    org: str | None = Field(None, json_schema_extra={"pattern": ID_PATTERN})


class OrgSwitch(Body):
    required = ("org",)
    org: str | None = Field(None, json_schema_extra={"pattern": ID_PATTERN})


class TokenCreate(Body):
    """`POST /v1/tokens`: every field narrows what the caller could grant (absent: all it can)."""

    user: str | None = Field(None, json_schema_extra={"pattern": ID_PATTERN})
    org: str | None = Field(None, json_schema_extra={"pattern": ID_PATTERN})
    role: str | None = Field(None, examples=["viewer"])
    scopes: StrList | None = None
    ttl: str | None = Field(None, examples=["15m"])


class TokenRefresh(Body):
    required = ("refresh_token",)
    refresh_token: str | None = None
    grant_type: str | None = Field(None, json_schema_extra={"enum": ["refresh_token", None]})


class TokenRevoke(Body):
    """RFC 7009: `token`, and optionally what it is (the gateway finds out either way)."""

    required = ("token",)
    token: str | None = None
    token_type_hint: str | None = Field(None, json_schema_extra={"enum": ["refresh_token", "access_token", None]})


REQUESTS: tuple[type[Body], ...] = (
    KeyCreate,
    Rotate,
    Named,
    Role,
    MemberAdd,
    MemberRole,
    VerifyRequest,
    SessionCreate,
    OrgSwitch,
    TokenCreate,
    TokenRefresh,
    TokenRevoke,
)


def read(model: type[Body], data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a JSON object) checked against `model`: the fields sent, as sent. InvalidRequest names the
    first field at fault (unknown fields first, then wrong types, then missing ones, each in name order)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise _refusal(exc) from None
    if model.nulls_refused:
        for name in sorted(n for n, v in data.items() if v is None):
            raise InvalidRequest(f"{name} has the wrong type", field=name)
    for name in sorted(model.required):
        if data.get(name) is None:
            raise InvalidRequest(f"{name} is required", field=name)
    return data


def _refusal(exc: ValidationError) -> InvalidRequest:
    found: list[tuple[int, str, str]] = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            found.append((0, name, f"unknown field {name}"))
        else:
            found.append((1, name, f"{name} has the wrong type"))
    _, name, message = min(found)
    return InvalidRequest(message, field=name)
