"""The MongoDB key store (docs/storage.md has the schema).

Keys and their versions are separate documents, so a key with thousands of
versions never becomes one huge document. Every write is safe with several
server processes on one database:

- a new key is one document with its first version inside it: one atomic
  insert, so a crashed or repeated creation leaves nothing half-made;
- a rotation inserts version n+1 into `key_versions` (a unique (key_id,
  version) index makes a second writer of n+1 fail), then moves the key's
  primary to it with a compare-and-set on the key's revision. A key is its
  versions up to its primary (what its integrity tag covers): a version above
  the primary is "pending" — its writer stopped between the two writes, or is
  between them now — and the next rotation finishes it (see
  KeyLifecycle.rotate_key) rather than failing on it;
- at most one master key per tenant is enforced by a unique partial index.

Every round trip is bounded by the store timeout and, through `time_left`, by
the current call's deadline, so a dead database answers UNAVAILABLE instead of
hanging a worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
from bson.binary import Binary
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.errors import StoreUnavailable
from crypto_server.domain.keys import KEY_STATE_RULE, Key, KeyPolicy, KeyState, KeyType, KeyVersion, state_condition
from crypto_server.storage.mongo_client import STORE_APP_NAME, mongo_client
from crypto_server.storage.port import (
    GIVE_BACK_IDS_KEPT,
    DuplicateKeyId,
    DuplicateMasterKey,
    KeyChange,
    KeyCounts,
    KeyQuery,
    Reservation,
    VersionRef,
    stored_encryption_count,
)

_ROOT_KEY_CHECK_ID = "root_key_check"


def _embedded_version_set(number: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An update-pipeline expression for a key document's `versions` array with `fields` set on version `number`
    (computed from `$$item`, that version as it was) and every other version as it was."""
    return {
        "$map": {
            "input": "$versions",
            "as": "item",
            "in": {"$cond": [{"$eq": ["$$item.version", number]}, {"$mergeObjects": ["$$item", fields]}, "$$item"]},
        }
    }


def _ms(duration: timedelta | None) -> int | None:
    return None if duration is None else duration // timedelta(milliseconds=1)


def _duration(ms: int | None) -> timedelta | None:
    return None if ms is None else timedelta(milliseconds=ms)


# Keys per read of latest_changes (one `$in` on the primary key).
_LATEST_CHANGES_BATCH = 500
# The changed_at of a key written before writes recorded one.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _now() -> datetime:
    # Bookkeeping for the change feed: real time, not the service's (injectable) clock.
    return datetime.now(UTC)


# The stored next destruction time of a key whose erasure is under way: due at once, until it is finished.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def _state_filter(state: KeyState, now: datetime) -> dict[str, Any]:
    """domain/keys.py KEY_STATE_RULE's condition for `state` as a filter on key documents: the only place this
    store spells out a key's effective state."""
    condition = state_condition(state)
    found: dict[str, Any] = {}
    if condition.disabled is not None:
        found["disabled"] = condition.disabled
    if condition.primary_expired is True:
        found["primary_expires_at"] = {"$ne": None, "$lte": now}
    elif condition.primary_expired is False:
        found["$or"] = [{"primary_expires_at": None}, {"primary_expires_at": {"$gt": now}}]
    return found


def _matcher(wanted: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """`wanted` (a version number range or a request id, as _versions_in is given) applied to an embedded version."""
    if "request_id" in wanted:
        return lambda item: item.get("request_id") == wanted["request_id"]
    after = wanted["version"]["$gt"]
    return lambda item: item["version"] > after


def _all_of_it(timeout_s: float) -> float:
    return timeout_s


class MongoKeyStore:
    """KeyStore over MongoDB (see storage/port.py for the contract)."""

    def __init__(
        self, uri: str, database: str, *, timeout_s: float = 5.0, time_left: Callable[[float], float] = _all_of_it
    ) -> None:
        """`time_left(timeout_s)`: how long the next round trip may take, at most `timeout_s`; the server passes
        the time its current call has left (the default allows the whole store timeout)."""
        self._timeout_s = timeout_s
        self._time_left = time_left
        self._client = mongo_client(uri, timeout_s=timeout_s, app_name=STORE_APP_NAME)
        db = self._client[database]
        self.database = database
        self._keys = db["keys"]
        self._versions = db["key_versions"]
        self._meta = db["store_meta"]
        self._leases = db["leases"]
        with self._bounded():
            self._keys.create_index(
                [("tenant_id", ASCENDING)],
                name="one_master_key_per_tenant",
                unique=True,
                partialFilterExpression={"key_type": KeyType.MASTER.value},
            )
            self._keys.create_index(
                [("tenant_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
                name="keys_by_tenant_created",
            )
            self._keys.create_index([("changed_at", ASCENDING)], name="keys_by_change")
            self._keys.create_index([("next_rotation_at", ASCENDING)], name="keys_by_next_rotation")
            self._keys.create_index(
                [("next_destruction_at", ASCENDING)],
                name="keys_by_next_destruction",
                partialFilterExpression={"next_destruction_at": {"$type": "date"}},
            )
            self._versions.create_index(
                [("key_id", ASCENDING), ("version", ASCENDING)], name="one_version_per_number", unique=True
            )
            self._versions.create_index(
                [("key_id", ASCENDING), ("request_id", ASCENDING)],
                name="one_version_per_request",
                unique=True,
                partialFilterExpression={"request_id": {"$type": "string"}},
            )

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        """Bound the round trips inside by the call's deadline; driver errors become StoreUnavailable."""
        try:
            with pymongo.timeout(max(0.001, self._time_left(self._timeout_s))):
                yield
        except DuplicateKeyError:
            raise
        except PyMongoError as error:
            if error.timeout:
                raise StoreUnavailable("the key store did not answer in time; retry later") from error
            raise StoreUnavailable(f"the key store failed ({type(error).__name__}); retry later") from error

    # -- documents -------------------------------------------------------------

    @staticmethod
    def _key_document(key: Key) -> dict[str, Any]:
        return {
            "_id": key.key_id,
            "tenant_id": key.tenant_id,
            "key_type": key.key_type.value,
            "disabled": key.disabled,
            "primary_version": key.primary_version,
            "primary_expires_at": key.expires_at,
            "created_at": key.created_at,
            "expire_after_ms": _ms(key.policy.expire_after),
            "rotation_period_ms": _ms(key.policy.rotation_period),
            "labels": dict(key.labels),
            "parent_key_id": key.parent_key_id,
            "revision": key.revision,
            "algorithm": key.algorithm.value,
            "integrity_tag": Binary(key.integrity_tag),
            "changed_at": _now(),
            # Key.next_rotation_at, outside the integrity tag: the rotator's index, re-checked per key.
            "next_rotation_at": key.next_rotation_at,
            # The first version lives inside the key document, so that creating a key is one write.
            "versions": [MongoKeyStore._version_fields(v) for v in key.versions],
            **MongoKeyStore._state_fields(key),
        }

    @staticmethod
    def _state_fields(key: Key) -> dict[str, Any]:
        """Version states live in the key document whichever collection holds the version's material, so that
        a change of state is one compare-and-set with the integrity tag that covers it."""
        states = {
            str(v.version): {"disabled": v.disabled, "destroy_at": v.destroy_at, "destroyed_at": v.destroyed_at}
            for v in key.versions
            if v.disabled or v.destroy_at is not None or v.destroyed_at is not None
        }
        return {
            "min_decryption_version": key.min_decryption_version,
            "version_states": states,
            # Key.next_destruction_at, outside the integrity tag: the destruction pass's index.
            "next_destruction_at": key.next_destruction_at,
        }

    @staticmethod
    def _version_fields(version: KeyVersion) -> dict[str, Any]:
        return {
            "version": version.version,
            "created_at": version.created_at,
            "expires_at": version.expires_at,
            "parent_version": version.parent_version,
            "wrapped_material": Binary(version.wrapped_material),
            "request_id": version.request_id,
            "integrity_tag": Binary(version.integrity_tag),
        }

    @staticmethod
    def _version_document(key_id: str, version: KeyVersion) -> dict[str, Any]:
        return {"key_id": key_id, **MongoKeyStore._version_fields(version)}

    @staticmethod
    def _version(item: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> KeyVersion:
        state = state or {}
        return KeyVersion(
            version=item["version"],
            created_at=_utc(item["created_at"]),  # type: ignore[arg-type]
            expires_at=_utc(item["expires_at"]),
            parent_version=item["parent_version"],
            wrapped_material=bytes(item["wrapped_material"]),
            request_id=item.get("request_id"),
            encryptions=stored_encryption_count(item.get("encryptions"), item.get("key_id"), item["version"]),
            disabled=state.get("disabled", False),
            destroy_at=_utc(state.get("destroy_at")),
            destroyed_at=_utc(state.get("destroyed_at")),
            integrity_tag=bytes(item.get("integrity_tag", b"")),
        )

    @staticmethod
    def _held(document: Mapping[str, Any]) -> set[int]:
        """The versions a key document's key holds: its primary and those with a state of their own."""
        # A name that is not a number (an edit) names no version: the key's tag, which lists the states of its
        # versions by number, tells whether one is missing.
        states = document.get("version_states") or {}
        return {document["primary_version"], *(int(name) for name in states if name.isdecimal())}

    def _with_versions(self, documents: Sequence[Mapping[str, Any]], *, every: bool = False) -> list[Key]:
        """Keys holding their primary and the versions with a state of their own (with `every`, all of them)."""
        if not documents:
            return []
        versions: dict[str, dict[int, KeyVersion]] = {doc["_id"]: {} for doc in documents}
        states = {doc["_id"]: doc.get("version_states") or {} for doc in documents}
        held = {doc["_id"]: self._held(doc) for doc in documents}
        wanted: dict[str, Any] = {"key_id": {"$in": list(versions)}}
        if not every:
            wanted["version"] = {"$in": sorted(set().union(*held.values()))}
        for item in self._versions.find(wanted):
            key_id = item["key_id"]
            versions[key_id][item["version"]] = self._version(item, states[key_id].get(str(item["version"])))
        keys = []
        for doc in documents:
            found = versions[doc["_id"]]
            state_of = states[doc["_id"]]
            # Keys created before versions moved into the key document have them all in key_versions.
            found.update(
                (item["version"], self._version(item, state_of.get(str(item["version"]))))
                for item in doc.get("versions", ())
            )
            primary = doc["primary_version"]
            keep = range(1, primary + 1) if every else held[doc["_id"]]
            keys.append(
                Key(
                    key_id=doc["_id"],
                    tenant_id=doc["tenant_id"],
                    key_type=KeyType(doc["key_type"]),
                    disabled=doc["disabled"],
                    primary_version=primary,
                    # A key is its versions up to the primary; a higher one is a pending rotation.
                    versions=tuple(found[number] for number in sorted(found) if number <= primary and number in keep),
                    created_at=_utc(doc["created_at"]),  # type: ignore[arg-type]
                    policy=KeyPolicy(_duration(doc["expire_after_ms"]), _duration(doc["rotation_period_ms"])),
                    labels=doc["labels"],
                    parent_key_id=doc["parent_key_id"],
                    revision=doc["revision"],
                    algorithm=Algorithm(doc.get("algorithm", Algorithm.AES_256_GCM.value)),
                    integrity_tag=bytes(doc.get("integrity_tag", b"")),
                    min_decryption_version=doc.get("min_decryption_version", 0),
                )
            )
        return keys

    def _versions_in(self, tenant_id: str, key_id: str, wanted: Mapping[str, Any], limit: int) -> list[KeyVersion]:
        """Up to `limit` of the key's versions (at most its primary) that match `wanted`, ascending: from
        `key_versions` and from the key document (a key's first version, or every version of an imported key)."""
        document = self._keys.find_one(
            {"_id": key_id, "tenant_id": tenant_id}, {"primary_version": 1, "version_states": 1, "versions": 1}
        )
        if document is None:
            return []
        states = document.get("version_states") or {}
        primary = document["primary_version"]
        found: dict[int, KeyVersion] = {}
        query = {"key_id": key_id, **wanted}
        for item in self._versions.find(query).sort("version", ASCENDING).limit(limit):
            found[item["version"]] = self._version(item, states.get(str(item["version"])))
        matches = _matcher(wanted)
        for item in document.get("versions", ()):
            if matches(item):
                found[item["version"]] = self._version(item, states.get(str(item["version"])))
        return [found[number] for number in sorted(found) if number <= primary][:limit]

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        with self._bounded():
            return self._versions_in(tenant_id, key_id, {"version": {"$gt": after_version}}, limit)

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        with self._bounded():
            found = self._versions_in(tenant_id, key_id, {"request_id": request_id}, 1)
        return found[0] if found else None

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        """The versions' tags first (each is the same whoever computes it, so writing it before the
        compare-and-set is harmless if that fails), then the key's tag from the revision read."""
        current = {"_id": updated.key_id, "tenant_id": updated.tenant_id, "revision": expected_revision}
        tags = {v.version: Binary(v.integrity_tag) for v in updated.versions}
        with self._bounded():
            document = self._keys.find_one(current, {"versions.version": 1})
            if document is None:
                return False
            embedded = {
                f"versions.{index}.integrity_tag": tags[item["version"]]
                for index, item in enumerate(document.get("versions", []))
                if item["version"] in tags
            }
            outside = [number for number in tags if number not in {i["version"] for i in document.get("versions", [])}]
            if outside:
                self._versions.bulk_write(
                    [
                        pymongo.UpdateOne(
                            {"key_id": updated.key_id, "version": n}, {"$set": {"integrity_tag": tags[n]}}
                        )
                        for n in outside
                    ]
                )
            moved = self._keys.update_one(
                current,
                {
                    "$set": {**embedded, "integrity_tag": Binary(updated.integrity_tag), "changed_at": _now()},
                    "$inc": {"revision": 1},
                },
            )
        return moved.matched_count == 1

    # -- reads -----------------------------------------------------------------

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        with self._bounded():
            document = self._keys.find_one({"_id": key_id, "tenant_id": tenant_id})
            keys = self._with_versions([document] if document else [])
        return keys[0] if keys else None

    def get_master_key(self, tenant_id: str) -> Key | None:
        with self._bounded():
            document = self._keys.find_one({"tenant_id": tenant_id, "key_type": KeyType.MASTER.value})
            keys = self._with_versions([document] if document else [])
        return keys[0] if keys else None

    def list_keys(self, query: KeyQuery) -> list[Key]:
        conditions: list[dict[str, Any]] = [{"tenant_id": query.tenant_id}]
        if query.key_type is not None:
            conditions.append({"key_type": query.key_type.value})
        if query.state is not None:
            conditions.append(_state_filter(query.state, query.now))
        if query.after is not None:
            after = query.after
            conditions.append(
                {
                    "$or": [
                        {"created_at": {"$gt": after.created_at}},
                        {"created_at": after.created_at, "_id": {"$gt": after.key_id}},
                    ]
                }
            )
        with self._bounded():
            documents = list(
                self._keys.find({"$and": conditions})
                .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
                .limit(query.limit)
            )
            return self._with_versions(documents)

    # -- writes ----------------------------------------------------------------

    def insert_key(self, key: Key) -> None:
        with self._bounded():
            if self._keys.count_documents({"_id": key.key_id}, limit=1):
                raise DuplicateKeyId(key.key_id)
            # Version documents with no key document were left by a creation that crashed half-way
            # (before creation became one write); they would shadow nothing but confuse a reader.
            self._versions.delete_many({"key_id": key.key_id})
            try:
                self._keys.insert_one(self._key_document(key))
            except DuplicateKeyError as error:
                if self._keys.count_documents({"_id": key.key_id}, limit=1):
                    raise DuplicateKeyId(key.key_id) from None  # the same key created concurrently
                raise DuplicateMasterKey(key.tenant_id) from error

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        version = updated.primary
        current = {"_id": updated.key_id, "tenant_id": updated.tenant_id, "revision": expected_revision}
        with self._bounded():
            if self._keys.count_documents(current, limit=1) == 0:
                return False
            try:
                self._versions.insert_one(self._version_document(updated.key_id, version))
            except DuplicateKeyError:
                existing = self._versions.find_one({"key_id": updated.key_id, "version": version.version})
                if existing is None or bytes(existing["wrapped_material"]) != version.wrapped_material:
                    return False  # another writer's version has that number or this request id
                # Our own version, written by an attempt that stopped before the second write (tagged now,
                # if that attempt wrote it without: the tag is the same whoever computes it).
                self._versions.update_one(
                    {"_id": existing["_id"]}, {"$set": {"integrity_tag": Binary(version.integrity_tag)}}
                )
            # Only from the revision the caller read: a concurrent change (another rotation, a
            # disable) makes this match nothing, and the version stays pending for the next rotation.
            moved = self._keys.update_one(
                current,
                {
                    "$set": {
                        "primary_version": version.version,
                        "primary_expires_at": version.expires_at,
                        "integrity_tag": Binary(updated.integrity_tag),
                        "changed_at": _now(),
                        "next_rotation_at": updated.next_rotation_at,
                    },
                    "$inc": {"revision": 1},
                },
            )
            return moved.matched_count == 1

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        with self._bounded():
            changed = self._keys.update_one(
                {"_id": updated.key_id, "tenant_id": updated.tenant_id, "revision": expected_revision},
                {
                    "$set": {
                        "disabled": updated.disabled,
                        "expire_after_ms": _ms(updated.policy.expire_after),
                        "rotation_period_ms": _ms(updated.policy.rotation_period),
                        "labels": dict(updated.labels),
                        "integrity_tag": Binary(updated.integrity_tag),
                        "changed_at": _now(),
                        "next_rotation_at": updated.next_rotation_at,
                        "min_decryption_version": updated.min_decryption_version,
                    },
                    "$inc": {"revision": 1},
                },
            )
        return changed.matched_count == 1

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        """One compare-and-set of the key document (states, tag, the embedded versions' material erased), then
        the erasure in `key_versions`. Until that second step is done the key stays due for destruction
        (next_destruction_at: the epoch), so a pass that stops between the two is finished by the next."""
        current = {"_id": updated.key_id, "tenant_id": updated.tenant_id, "revision": expected_revision}
        destroyed = {v.version for v in updated.versions if v.destroyed}
        with self._bounded():
            document = self._keys.find_one(current, {"versions.version": 1})
            if document is None:
                return False
            inside = destroyed & {item["version"] for item in document.get("versions", [])}
            outside = destroyed - inside
            fields = self._state_fields(updated)
            if outside or (destroyed and updated.primary.destroyed):
                fields["next_destruction_at"] = _EPOCH
            erased: dict[str, Any] = {}
            if inside:
                # Only the material field of each embedded version: the array is never written back whole, so
                # an encryption count reserved in between (reserve_encryptions) is not lost.
                erased = {"versions.$[erased].wrapped_material": Binary(b"")}
            moved = self._keys.update_one(
                current,
                {
                    "$set": {
                        **fields,
                        **erased,
                        "integrity_tag": Binary(updated.integrity_tag),
                        "changed_at": _now(),
                        "next_rotation_at": updated.next_rotation_at,
                    },
                    "$inc": {"revision": 1},
                },
                array_filters=[{"erased.version": {"$in": sorted(inside)}}] if inside else None,
            )
            if moved.matched_count != 1:
                return False
            if fields["next_destruction_at"] is _EPOCH:
                if outside:
                    self._versions.update_many(
                        {"key_id": updated.key_id, "version": {"$in": sorted(outside)}},
                        {"$set": {"wrapped_material": Binary(b"")}},
                    )
                if updated.primary.destroyed:
                    # A pending version (a rotation that stopped half-way) of a destroyed key goes too.
                    self._versions.delete_many({"key_id": updated.key_id, "version": {"$gt": updated.primary_version}})
                self._keys.update_one(
                    {"_id": updated.key_id, "revision": expected_revision + 1},
                    {"$set": {"next_destruction_at": updated.next_destruction_at}},
                )
        return True

    def keys_due_for_destruction(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        with self._bounded():
            documents = list(
                self._keys.find({"next_destruction_at": {"$ne": None, "$lte": now}}, {"tenant_id": 1})
                .sort([("next_destruction_at", ASCENDING)])
                .limit(limit)
            )
        return [(document["tenant_id"], document["_id"]) for document in documents]

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        # A document from before automatic rotation has no next_rotation_at: looked at (and rescheduled) once.
        due = {"$or": [{"next_rotation_at": {"$ne": None, "$lte": now}}, {"next_rotation_at": {"$exists": False}}]}
        with self._bounded():
            documents = list(
                self._keys.find(due, {"tenant_id": 1}).sort([("next_rotation_at", ASCENDING)]).limit(limit)
            )
        return [(document["tenant_id"], document["_id"]) for document in documents]

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        with self._bounded():
            self._keys.update_one(
                {"_id": key_id, "tenant_id": tenant_id, "revision": expected_revision},
                {"$set": {"next_rotation_at": next_rotation_at}},
            )

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        """One findAndModify with an update pipeline: the grant is computed from the stored count inside the
        atomic update and stored beside it (`last_reservation`), and both come back in the post-image, which is
        the document this write produced (a pre-image need not be: secantus reads it before writing).

        A version is embedded in the key document (a key's first, or every version of an imported key) or in
        `key_versions` (made by a rotation), and stays where it was written: version 1 is looked for in the key
        document first, any later one in `key_versions` first, so the usual case is one round trip."""

        def reserved(count: Any) -> dict[str, Any]:
            # Both fields of one $set see the document before it: the grant is computed from the same count.
            count = {"$ifNull": [count, 0]}  # versions are written without a count
            grant = {"$min": [wanted, {"$max": [0, {"$subtract": [limit, count]}]}]}
            return {"encryptions": {"$add": [count, grant]}, "last_reservation": grant}

        def in_key_document() -> Mapping[str, Any] | None:
            key = self._keys.find_one_and_update(
                {"_id": version.key_id, "tenant_id": version.tenant_id, "versions.version": version.version},
                [{"$set": {"versions": _embedded_version_set(version.version, reserved("$$item.encryptions"))}}],
                projection={"versions.version": 1, "versions.encryptions": 1, "versions.last_reservation": 1},
                return_document=pymongo.ReturnDocument.AFTER,
            )
            if key is None:
                return None
            written: Mapping[str, Any] = next(item for item in key["versions"] if item["version"] == version.version)
            return written

        def in_key_versions() -> Mapping[str, Any] | None:
            return self._versions.find_one_and_update(
                {"key_id": version.key_id, "version": version.version},
                [{"$set": reserved("$encryptions")}],
                projection={"encryptions": 1, "last_reservation": 1},
                return_document=pymongo.ReturnDocument.AFTER,
            )

        first, second = (
            (in_key_document, in_key_versions) if version.version == 1 else (in_key_versions, in_key_document)
        )
        with self._bounded():
            written = first()
            if written is None:
                written = second()
        if written is None:
            return None
        return Reservation(int(written["last_reservation"]), int(written["encryptions"]))

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        """$inc on the version: in `key_versions`, or embedded in the key document (a key's first versions).
        Each increment is atomic; a flush is not (a failure part-way leaves the rest for the next flush)."""
        totals: dict[VersionRef, int] = {}
        with self._bounded():
            for ref, count in counts.items():
                document = self._versions.find_one_and_update(
                    {"key_id": ref.key_id, "version": ref.version},
                    {"$inc": {"encryptions": count}},
                    projection={"encryptions": 1},
                    return_document=pymongo.ReturnDocument.AFTER,
                )
                if document is not None:
                    totals[ref] = document["encryptions"]
                    continue
                key = self._keys.find_one_and_update(
                    {"_id": ref.key_id, "tenant_id": ref.tenant_id, "versions.version": ref.version},
                    {"$inc": {"versions.$[counted].encryptions": count}},
                    array_filters=[{"counted.version": ref.version}],
                    projection={"versions.version": 1, "versions.encryptions": 1},
                    return_document=pymongo.ReturnDocument.AFTER,
                )
                for embedded in key.get("versions", []) if key is not None else []:
                    if embedded["version"] == ref.version:
                        totals[ref] = embedded["encryptions"]
        return totals

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        """One conditional update per version: an update pipeline that subtracts the count and appends the id
        to `given_back` unless the id is already there, both computed from the same document inside the atomic
        update; so repeating it after an unknown outcome changes nothing where it landed. A flush is not atomic
        across versions, and need not be: each version is given back once, whichever attempt lands it."""

        def given_back(count_field: str, ids_field: str, count: int) -> dict[str, Any]:
            # Both fields of one $set see the document before it: the id check and the subtraction agree.
            ids = {"$ifNull": [ids_field, []]}
            landed = {"$in": [give_back_id, ids]}
            stored = {"$ifNull": [count_field, 0]}
            return {
                "encryptions": {"$cond": [landed, stored, {"$max": [0, {"$subtract": [stored, count]}]}]},
                "given_back": {
                    "$cond": [landed, ids, {"$slice": [{"$concatArrays": [ids, [give_back_id]]}, -GIVE_BACK_IDS_KEPT]}]
                },
            }

        with self._bounded():
            for ref, count in counts.items():
                in_versions = (
                    self._versions,
                    {"key_id": ref.key_id, "version": ref.version},
                    given_back("$encryptions", "$given_back", count),
                )
                in_key_document = (
                    self._keys,
                    {"_id": ref.key_id, "tenant_id": ref.tenant_id, "versions.version": ref.version},
                    {
                        "versions": _embedded_version_set(
                            ref.version, given_back("$$item.encryptions", "$$item.given_back", count)
                        )
                    },
                )
                places = (in_key_document, in_versions) if ref.version == 1 else (in_versions, in_key_document)
                for collection, where, fields in places:
                    if collection.update_one(where, [{"$set": fields}]).matched_count:
                        break

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        with self._bounded():
            self._keys.update_one(
                {
                    "_id": version.key_id,
                    "tenant_id": version.tenant_id,
                    "primary_version": version.version,
                    "next_rotation_at": {"$not": {"$lte": now}},
                },
                {"$set": {"next_rotation_at": now}},
            )

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        # Matches only a lease this holder has or one that has run out; when neither matches, the upsert
        # collides with the live lease's _id: exactly one of any number of concurrent callers wins.
        free = {"_id": name, "$or": [{"holder": holder}, {"expires_at": {"$lte": now}}]}
        with self._bounded():
            try:
                self._leases.update_one(free, {"$set": {"holder": holder, "expires_at": now + ttl}}, upsert=True)
            except DuplicateKeyError:
                return False
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self._bounded():
            self._leases.delete_one({"_id": name, "holder": holder})

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        with self._bounded():
            document = self._keys.find_one({"_id": key_id, "tenant_id": tenant_id}, {"primary_version": 1})
            if document is None or document["primary_version"] >= number:
                return None
            item = self._versions.find_one({"key_id": key_id, "version": number})
        return None if item is None else self._version(item)

    def master_keys(self) -> Iterator[Key]:
        after = ""
        while True:
            with self._bounded():
                documents = list(
                    self._keys.find({"key_type": KeyType.MASTER.value, "_id": {"$gt": after}})
                    .sort("_id", ASCENDING)
                    .limit(500)
                )
                # Every version: a root key rotation re-wraps them all.
                keys = self._with_versions(documents, every=True)
            if not keys:
                return
            yield from keys
            after = keys[-1].key_id

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        with self._bounded():
            document = self._keys.find_one({"_id": key_id, "tenant_id": tenant_id})
            if document is None:
                return False
            embedded = document.get("versions", [])
            if any(item["version"] == version for item in embedded):
                if not any(item["version"] == version and bytes(item["wrapped_material"]) == old for item in embedded):
                    return False
                # Only from the revision read (a concurrent change makes this a no-op), and only the material
                # field: writing the array back whole would lose an encryption count reserved in between.
                changed = self._keys.update_one(
                    {"_id": key_id, "revision": document["revision"]},
                    {
                        "$set": {"versions.$[rewrapped].wrapped_material": Binary(new), "changed_at": _now()},
                        "$inc": {"revision": 1},
                    },
                    array_filters=[{"rewrapped.version": version}],
                ).matched_count
                return changed == 1
            changed = self._versions.update_one(
                {"key_id": key_id, "version": version, "wrapped_material": Binary(old)},
                {"$set": {"wrapped_material": Binary(new)}},
            ).modified_count
            if changed:
                self._keys.update_one({"_id": key_id}, {"$inc": {"revision": 1}, "$set": {"changed_at": _now()}})
            return changed == 1

    def get_meta(self, name: str) -> bytes | None:
        with self._bounded():
            document = self._meta.find_one({"_id": name})
        return None if document is None else bytes(document["value"])

    def add_meta(self, name: str, value: bytes) -> bytes:
        # When another server stored one first, theirs is the value.
        with self._bounded(), contextlib.suppress(DuplicateKeyError):
            self._meta.insert_one({"_id": name, "value": Binary(value)})
        stored = self.get_meta(name)
        assert stored is not None
        return stored

    def replace_meta(self, name: str, value: bytes) -> None:
        with self._bounded():
            self._meta.replace_one({"_id": name}, {"value": Binary(value)}, upsert=True)

    def changed_keys(self, since: datetime) -> list[KeyChange]:
        with self._bounded():
            documents = self._keys.find(
                {"changed_at": {"$gte": since}},
                {"tenant_id": 1, "key_type": 1, "revision": 1, "changed_at": 1},
            )
            return [
                KeyChange(
                    doc["tenant_id"],
                    doc["_id"],
                    KeyType(doc["key_type"]),
                    doc["revision"],
                    doc["changed_at"].astimezone(UTC),
                )
                for doc in documents
            ]

    def latest_changes(self, keys: Sequence[tuple[str, str]]) -> list[KeyChange]:
        wanted = set(keys)
        ids = list(dict.fromkeys(key_id for _, key_id in keys))
        changes: list[KeyChange] = []
        with self._bounded():
            for start in range(0, len(ids), _LATEST_CHANGES_BATCH):
                documents = self._keys.find(
                    {"_id": {"$in": ids[start : start + _LATEST_CHANGES_BATCH]}},
                    {"tenant_id": 1, "key_type": 1, "revision": 1, "changed_at": 1},
                )
                changes.extend(
                    KeyChange(
                        doc["tenant_id"],
                        doc["_id"],
                        KeyType(doc["key_type"]),
                        doc["revision"],
                        (doc.get("changed_at") or _EPOCH).astimezone(UTC),
                    )
                    for doc in documents
                    if (doc["tenant_id"], doc["_id"]) in wanted
                )
        return changes

    def has_keys(self) -> bool:
        with self._bounded():
            return self._keys.count_documents({}, limit=1) > 0

    def replace_root_key_check(self, check: bytes) -> None:
        with self._bounded():
            self._meta.replace_one({"_id": _ROOT_KEY_CHECK_ID}, {"value": Binary(check)}, upsert=True)

    def get_root_key_check(self) -> bytes | None:
        with self._bounded():
            document = self._meta.find_one({"_id": _ROOT_KEY_CHECK_ID})
        return None if document is None else bytes(document["value"])

    def set_root_key_check(self, check: bytes) -> bytes:
        # When another server stored one first, theirs is the check.
        with self._bounded(), contextlib.suppress(DuplicateKeyError):
            self._meta.insert_one({"_id": _ROOT_KEY_CHECK_ID, "value": Binary(check)})
        stored = self.get_root_key_check()
        assert stored is not None
        return stored

    def key_counts(self, now: datetime) -> KeyCounts:
        counts: dict[tuple[KeyType, KeyState], int] = {}
        with self._bounded():
            for key_type in KeyType:
                for condition in KEY_STATE_RULE:
                    counted = self._keys.count_documents(
                        {"key_type": key_type.value, **_state_filter(condition.state, now)}
                    )
                    if counted:
                        counts[(key_type, condition.state)] = counted
            tenants = next(
                iter(self._keys.aggregate([{"$group": {"_id": "$tenant_id"}}, {"$count": "tenants"}])), {"tenants": 0}
            )["tenants"]
        return KeyCounts(counts, tenants)

    def ping(self) -> None:
        # A write, not a ping: a database that answers but cannot write (read-only, no primary, disk full)
        # must show in health, as every write fails.
        with self._bounded():
            self._meta.update_one({"_id": "health_probe"}, {"$set": {"at": _now()}}, upsert=True)

    def close(self) -> None:
        self._client.close()
