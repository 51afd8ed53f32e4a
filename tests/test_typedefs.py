"""Import layering: the decision path (the server's dispatch, forward auth, the Verifier and the AppKeys
it reaches) loads nothing of management, and the leaf modules load nothing but leaves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MANAGEMENT = {
    "gateway.keyring",
    "gateway.directory",
    "gateway.api",
    "gateway.ui",
    "gateway.openapi",
    "gateway.invitations",
    "gateway.cli",
    "gateway.session_api",
    "gateway.grants",
    "gateway.principal",
    "gateway.responses",
    "gateway.data.users",
    "gateway.data.invitations",
}


def _loaded(*modules: str) -> set[str]:
    code = f"import sys\nimport {', '.join(modules)}\nprint(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m for m in json.loads(out) if m.startswith("gateway")}


def test_the_decision_path_imports_no_management_code() -> None:
    """Issue 11: typedefs imported admin, so `/auth/*` loaded the management SQL with it."""
    loaded = _loaded("gateway._server", "gateway.forward", "gateway.verifier", "gateway.typedefs")
    assert "gateway.forward" in loaded
    assert not loaded & MANAGEMENT, sorted(loaded & MANAGEMENT)
    # Nor the request models of /v1/ (pydantic): /v1/keys/verify is served by its own module.
    assert not loaded & {"gateway.schemas", "gateway.keys_verify", "gateway._body"}
    code = "import sys, gateway._server; print('pydantic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(
    ("leaf", "allowed"),
    [
        ("gateway.constants", set()),
        ("gateway.errors", set()),
        ("gateway._breaker", {"gateway.constants"}),
        ("gateway.backends", {"gateway.errors", "gateway._breaker", "gateway.constants"}),
        ("gateway.models", {"gateway.constants"}),
        ("gateway.formats", {"gateway.errors"}),
    ],
)
def test_leaf_modules_import_only_leaves(leaf: str, allowed: set[str]) -> None:
    """Models, errors and backend failures sit in leaves (issue 11: `store` imported `cache` for
    KeyRecord, and the records' types dragged the cache tiers in wherever a record was named)."""
    assert _loaded(leaf) - {"gateway", leaf} <= allowed


def test_the_data_layer_imports_only_leaves() -> None:
    """gateway/data is below everything that uses it: no cache tier, no room of management, no HTTP."""
    loaded = _loaded(
        "gateway.store",
        "gateway.data.keys",
        "gateway.data.orgs",
        "gateway.data.users",
        "gateway.data.invitations",
        "gateway.data.audit",
        "gateway.data.schema",
    )
    above = {m for m in loaded if not m.startswith("gateway.data")} - {
        "gateway",
        "gateway.store",
        "gateway.constants",
        "gateway.errors",
        "gateway._breaker",
        "gateway.backends",
        "gateway.models",
        "gateway.config",
        "gateway.keys",
        "gateway.formats",
    }
    assert above == set()


def test_the_api_does_not_import_the_web_page() -> None:
    """Issue 11: api.py imported its session handling from ui.py; both now read gateway.sessions."""
    assert "gateway.ui" not in _loaded("gateway.api")
