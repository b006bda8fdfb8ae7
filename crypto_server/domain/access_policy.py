"""Who may do what: the access policy, as data (docs/security.md, "Identity and access").

A policy is a list of rules. Each rule names principals (exactly, or by a prefix ending in `*`), the
tenants they may act for (a list, or "*" for platform operators), the permissions they hold there, and
optionally the labels a key must carry for them to use it. Deny by default: a call is allowed when some
rule matching the caller grants the permission for the tenant (and, for a key-scoped call of a
label-narrowed rule, the key carries the rule's labels).

The text form (YAML or JSON, read by the transport) maps onto `AccessPolicy.from_document`:

    rules:
      - principals: ["spiffe://caas/ns/messaging/*"]
        tenants: "*"
        permissions: [encrypt, decrypt]
        labels: {team: messaging}
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


class Permission(enum.StrEnum):
    """What a rule allows; named after the calls it opens (transport/authorization.py has the table)."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    GENERATE_DATA_KEY = "generate_data_key"
    MAC = "mac"
    SIGN = "sign"
    SESSION_KEYS = "session_keys"
    MANAGE_KEYS = "manage_keys"
    READ_KEYS = "read_keys"
    # Root-key and tenant-wide operations; implies no other permission.
    ADMIN = "admin"
    AUDIT_READ = "audit_read"


class PolicyError(ValueError):
    """The policy document is not a valid policy; the message says where."""


ANY_TENANT = "*"
_RULE_FIELDS = frozenset({"principals", "tenants", "permissions", "labels", "description"})


@dataclass(frozen=True, slots=True)
class PrincipalPattern:
    """An exact principal name, or a prefix (the pattern's text before its one trailing `*`)."""

    text: str

    def __post_init__(self) -> None:
        if not self.text or "*" in self.text[:-1]:
            raise PolicyError(f"principal {self.text!r}: '*' may only end a pattern (a prefix match)")

    def matches(self, name: str) -> bool:
        if self.text.endswith("*"):
            return name.startswith(self.text[:-1])
        return name == self.text


@dataclass(frozen=True, slots=True)
class Rule:
    principals: tuple[PrincipalPattern, ...]
    tenants: frozenset[str] | None  # None: every tenant
    permissions: frozenset[Permission]
    labels: Mapping[str, str] | None  # None: every key of the tenant

    def applies(self, principal: str, tenant_id: str, permission: Permission) -> bool:
        return (
            permission in self.permissions
            and (self.tenants is None or tenant_id in self.tenants)
            and any(pattern.matches(principal) for pattern in self.principals)
        )


@dataclass(frozen=True, slots=True)
class KeyAccess:
    """What a granted permission reaches: every key of the tenant, or only keys carrying one of `label_sets`."""

    label_sets: tuple[Mapping[str, str], ...] = ()

    @property
    def unrestricted(self) -> bool:
        return not self.label_sets

    def allows(self, key_labels: Mapping[str, str]) -> bool:
        """Whether a key with `key_labels` may be used (or created with those labels)."""
        return self.unrestricted or any(
            all(key_labels.get(name) == value for name, value in wanted.items()) for wanted in self.label_sets
        )


EVERY_KEY = KeyAccess()


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    rules: tuple[Rule, ...]

    def access(self, principal: str, tenant_id: str, permission: Permission) -> KeyAccess | None:
        """The keys `principal` may use with `permission` for `tenant_id`; None when it may not at all."""
        label_sets: list[Mapping[str, str]] = []
        granted = False
        for rule in self.rules:
            if rule.applies(principal, tenant_id, permission):
                if rule.labels is None:
                    return EVERY_KEY
                granted = True
                label_sets.append(rule.labels)
        return KeyAccess(tuple(label_sets)) if granted else None

    @classmethod
    def from_document(cls, document: object) -> AccessPolicy:
        """A policy from its parsed YAML/JSON form. Raises PolicyError naming the faulty rule."""
        if not isinstance(document, Mapping) or set(document) - {"rules", "version"}:
            raise PolicyError("the policy must be a mapping with a 'rules' list (and optionally 'version: 1')")
        if document.get("version", 1) != 1:
            raise PolicyError("only policy version 1 is understood")
        rules = document.get("rules")
        if not isinstance(rules, list):
            raise PolicyError("'rules' must be a list")
        return cls(tuple(_rule(index, raw) for index, raw in enumerate(rules)))


def _strings(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise PolicyError(f"{where} must be a non-empty string or list of non-empty strings")
    return list(value)


def _rule(index: int, raw: Any) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} must be a mapping")
    unknown = set(raw) - _RULE_FIELDS
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
    try:
        principals = tuple(PrincipalPattern(text) for text in _strings(raw.get("principals"), f"{where}.principals"))
    except PolicyError as error:
        raise PolicyError(f"{where}: {error}") from None
    tenants = _strings(raw.get("tenants"), f"{where}.tenants")
    if ANY_TENANT in tenants and len(tenants) > 1:
        raise PolicyError(f"{where}.tenants: '*' stands alone (every tenant)")
    names = _strings(raw.get("permissions"), f"{where}.permissions")
    try:
        permissions = frozenset(Permission(name) for name in names)
    except ValueError:
        known = ", ".join(permission.value for permission in Permission)
        raise PolicyError(f"{where}.permissions: each must be one of {known}") from None
    labels = raw.get("labels")
    if labels is not None and (
        not isinstance(labels, Mapping)
        or not labels
        or not all(isinstance(name, str) and isinstance(value, str) for name, value in labels.items())
    ):
        raise PolicyError(f"{where}.labels must be a non-empty mapping of label names to string values")
    return Rule(
        principals=principals,
        tenants=None if tenants == [ANY_TENANT] else frozenset(tenants),
        permissions=permissions,
        labels=None if labels is None else MappingProxyType(dict(labels)),
    )
