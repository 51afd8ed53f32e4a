"""The `/v1/` request bodies, defined once: `read` validates a body with them, and `gateway.openapi`
documents them (their JSON Schema). pydantic, strict (no coercion) and closed (an unknown field is refused).

Every field may be sent as null, meaning absent, as before; a required one must be present and not null.
The checks that need the caller (which orgs, which role) stay with the handlers."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from gateway.errors import InvalidRequest

_LIST = {"type": "array", "items": {"type": "string"}, "maxItems": 100}
_ALL_OR_LIST = {"oneOf": [{"const": "all"}, _LIST]}
# Lists are checked by the handlers (their message names the bound); the schema says what is accepted.
StrList = Annotated[list[Any], WithJsonSchema(_LIST)]
AllOrList = Annotated[str | list[Any], WithJsonSchema(_ALL_OR_LIST)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    required: ClassVar[tuple[str, ...]] = ()
    nulls_refused: ClassVar[bool] = False  # a null is a wrong type here, not an absent field

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        schema = super().model_json_schema(*args, **kwargs)
        if cls.required:
            schema["required"] = list(cls.required)
        return schema


class KeyCreate(Body):
    required = ("name", "role")
    name: str | None = Field(None, json_schema_extra={"maxLength": 200})
    role: str | None = None
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
    name: str | None = None


class Role(Body):
    required = ("role",)
    role: str | None = None


class MemberAdd(Body):
    required = ("email", "role")
    email: str | None = Field(None, json_schema_extra={"format": "email"})
    role: str | None = None


class MemberRole(Body):
    required = ("name", "role")
    name: str | None = None
    role: str | None = None


class VerifyRequest(Body):
    """`POST /v1/keys/verify`: here a field sent is a string (null is refused, not taken as absent)."""

    required = ("key",)
    nulls_refused = True
    key: str | None = None
    org: str | None = None
    permission: str | None = None
    method: str | None = Field(None, examples=["GET"])
    path: str | None = Field(None, examples=["/v1/orgs/org_x/things"])


REQUESTS: tuple[type[Body], ...] = (KeyCreate, Rotate, Named, Role, MemberAdd, MemberRole, VerifyRequest)


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
