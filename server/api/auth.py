"""Bearer-key checks for `/v1/*` (api key) and the memory load/unload endpoints (admin key).

Keys are compared in constant time. The admin key also opens the ordinary endpoints. Without an admin
key the admin endpoints are off unless the operator enabled them explicitly (trusted networks only).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.config import ServerConfig
from server.errors import AuthenticationError, PermissionDeniedError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    if token is None or not key:
        return False
    return hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8"))


def _config(request: Request) -> ServerConfig:
    return request.app.state.memdec.config


def check_api_key(request: Request) -> None:
    """Dependency for `/v1/*`: with --api-key set, the api key or the admin key is required."""
    config = _config(request)
    if not config.api_key:
        return
    token = _bearer(request)
    # Both compares always run, so timing says nothing about which key (if any) was close.
    ok_api, ok_admin = _matches(token, config.api_key), _matches(token, config.admin_key)
    if not (ok_api or ok_admin):
        raise AuthenticationError(
            "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )


def check_admin_key(request: Request) -> None:
    """Dependency for memory load/unload."""
    config = _config(request)
    token = _bearer(request)
    if config.admin_key:
        if _matches(token, config.admin_key):
            return
        if token is not None and _matches(token, config.api_key):
            raise PermissionDeniedError("this endpoint needs the admin key", code="admin_key_required")
        raise AuthenticationError(
            "missing or invalid admin key: send 'Authorization: Bearer <admin key>'", code="invalid_api_key"
        )
    if not config.enable_admin:
        raise PermissionDeniedError(
            "memory administration is disabled: start the server with --admin-key (or --enable-admin on a "
            "trusted network)",
            code="admin_disabled",
        )
    check_api_key(request)
