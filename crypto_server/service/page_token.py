"""ListKeys and ListKeyVersions page tokens: opaque to callers, checked when they come back.

A token records where the previous page ended and which tenant and filters it
was for; a token replayed with another tenant or other filters, or altered,
is rejected as INVALID_ARGUMENT instead of returning a wrong page.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta

from crypto_server.domain.errors import InvalidArgument
from crypto_server.storage.port import KeyQuery, ListCursor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TOKEN_CHARS = 1024


def _scope(query: KeyQuery) -> list[str | None]:
    return [
        query.tenant_id,
        None if query.key_type is None else query.key_type.value,
        None if query.state is None else query.state.value,
    ]


def _encoded(body: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")


def _decoded(token: str, invalid: InvalidArgument) -> object:
    """The JSON value in `token`; `invalid` when it is none."""
    if len(token) > _MAX_TOKEN_CHARS:
        raise invalid
    try:
        return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise invalid from None


def encode_page_token(query: KeyQuery, cursor: ListCursor) -> str:
    created_us = (cursor.created_at - _EPOCH) // timedelta(microseconds=1)
    return _encoded({"v": 1, "scope": _scope(query), "created_us": created_us, "key_id": cursor.key_id})


def decode_page_token(token: str, query: KeyQuery) -> ListCursor:
    """Return the cursor in `token`, which must have been issued for the same tenant and filters."""
    invalid = InvalidArgument("page_token", "is not a page token from a previous ListKeys call")
    body = _decoded(token, invalid)
    if (
        not isinstance(body, dict)
        or body.get("v") != 1
        or not isinstance(body.get("created_us"), int)
        or not isinstance(body.get("key_id"), str)
    ):
        raise invalid
    if body.get("scope") != _scope(query):
        raise InvalidArgument("page_token", "was issued for another tenant or other filters")
    try:
        created_at = _EPOCH + timedelta(microseconds=body["created_us"])
    except OverflowError:
        raise invalid from None
    return ListCursor(created_at=created_at, key_id=body["key_id"])


# ListKeyVersions tokens: the same encoding, bound to the tenant and the key, holding the last version number of
# the page. The highest version number the API can name (KeyVersion.version is a uint32): a larger one is no
# token this server issued, and would not fit the stores' integers.
_MAX_VERSION = 2**32 - 1


def _version_scope(tenant_id: str, key_id: str) -> list[str]:
    return ["versions", tenant_id, key_id]


def encode_version_page_token(tenant_id: str, key_id: str, after_version: int) -> str:
    return _encoded({"v": 1, "scope": _version_scope(tenant_id, key_id), "after": after_version})


def decode_version_page_token(token: str, tenant_id: str, key_id: str) -> int:
    """The last version number of the previous page, from `token`, which must have been issued for the same
    tenant and key."""
    invalid = InvalidArgument("page_token", "is not a page token from a previous ListKeyVersions call")
    body = _decoded(token, invalid)
    if not isinstance(body, dict) or body.get("v") != 1 or not isinstance(body.get("scope"), list):
        raise invalid
    after = body.get("after")
    # type(), not isinstance: JSON true is a bool, which isinstance counts as an int.
    if type(after) is not int or not 0 <= after <= _MAX_VERSION:
        raise invalid
    if body["scope"] != _version_scope(tenant_id, key_id):
        raise InvalidArgument("page_token", "was issued for another tenant or key")
    return after
