"""`SharedRegistry`: the registry file, with the clients' dynamic state shared by every
replica through Redis (DESIGN "Clients": with `redis_url` set, pending clients, approvals
and pinned documents are shared; the TOML file stays the embedded default).

What lives where:

- The file (each replica's own `registry_file`): the servers, and the static configuration
  of the clients defined in it (key or secret, audiences, scopes, binding, limits, owner,
  SPIFFE ID, key dates). `clients add|update|rotate-key|remove` still change the file.
- Redis: the dynamic state of every client (`DYNAMIC_FIELDS`: status; who approved it,
  when, until when, under which rule; a CIMD document's pinned thumbprints, fingerprint
  and domain), and the whole record of a CIMD client (an `https://` id) that no file
  defines: first seen at run time, or approved before its first request.

A client is its file record overlaid with its Redis state; a CIMD client that no file
defines is its Redis record; a file client without Redis state is what its file says (so a
deployment that turns Redis on keeps the approvals its file holds).

Keys, `<prefix>` being the store's (`tb`). One hash tag holds the whole registry, so each
change is one atomic script on one Redis or one Cluster slot, and a replica reads every
change since its last read in one round trip (the state is small and changes at the pace
of approvals and first sightings, so one slot is no hot spot):

- `<prefix>:registry:{registry}:clients`  hash: client id -> JSON `{"v": 1, "kind":
  "state" | "record", "record": {...}}`, the record in the file's shape ("state": only
  `DYNAMIC_FIELDS`)
- `...:changes`  sorted set: each entry's id, scored by the version of its last write
- `...:removed`  sorted set: removed ids, scored by the version of the removal (the last
  `MAX_REMOVED`; `meta.trimmed` is the newest one forgotten)
- `...:meta`     hash: `version` (a counter), `epoch` (random, made by the first write, so
  it vanishes with lost data), `trimmed`

Reading. `serve` (`follow=True`) keeps a copy of the whole shared state, brought up to
date by a thread every `POLL_SECONDS` (one script call: nothing when nothing changed,
else the changed entries): `client()` never waits for Redis (it runs on the asyncio door
too), and an approval made on any replica applies on all of them within about
`POLL_SECONDS`. When Redis stops answering, reads use the last copy for
`STALE_AFTER_SECONDS`, then raise `StoreUnavailableError` (HTTP 503, gRPC UNAVAILABLE):
an unreachable registry lets nobody in, file clients included, since their approval may
have been withdrawn in Redis. The CLI (`follow=False`) reads Redis on each use instead.

Writing goes to Redis at once or raises `StoreUnavailableError`: nothing is half-recorded
when Redis is down. `update_client` is a compare-and-set on the entry's version (retried),
so two replicas changing one client at once lose neither change.

Lost state (Redis restarted without persistence, FLUSHALL): the epoch changes and every
replica reloads, logging an error. CIMD records are gone (those clients are unknown again
and refused); file clients fall back to what their file says.

Bounds: at most `MAX_SHARED_CLIENTS` entries (a new one beyond is refused, naming the
bound) of at most `MAX_ENTRY_BYTES` each; the local copy holds no more than Redis may."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from tokenbroker.cimd_clients import is_cimd_client_id
from tokenbroker.errors import InvalidArgumentError, StoreUnavailableError, TokenBrokerError
from tokenbroker.registry import ClientRecord
from tokenbroker.registry_file import FileRegistry, check_id, checked_client, client_from_dict, client_to_dict
from tokenbroker.store.redis_errors import STORE_ERRORS, ReplyError, unavailable
from tokenbroker.store.redis_replies import reply_text, reply_texts

if TYPE_CHECKING:
    import os

    from tokenbroker.config import Settings
    from tokenbroker.store.base import Store
    from tokenbroker.store.redis_connect import SyncClient

log = structlog.get_logger("tokenbroker.registry")

# The fields of a client that change at run time and are shared: its status and approval,
# and what was pinned of its CIMD document. Every other field is static configuration.
DYNAMIC_FIELDS = (
    "status",
    "approved_by",
    "approved_at",
    "approved_until",
    "approval_rule",
    "pinned_thumbprints",
    "document_fingerprint",
    "document_domain",
)
MAX_SHARED_CLIENTS = 10_000
MAX_ENTRY_BYTES = 16 * 1024  # a record with an 8192-bit RSA key and 64 pins is about 5 KiB
MAX_REMOVED = 1_000
POLL_SECONDS = 0.25
STALE_AFTER_SECONDS = 5.0
_CLI_REFRESH_SECONDS = 0.5  # follow=False: a read older than this reads Redis again
_POLL_LIMIT = 512  # changes read per poll; more wait for the next one
_CAS_ATTEMPTS = 8
_STATE, _RECORD = "state", "record"
_SOURCE = "the shared registry in Redis"
# What a registry call can raise when Redis is down or answers what it should not.
_CALL_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, ReplyError, KeyError, TypeError, IndexError)

_PUT = """
-- KEYS: meta, changes, removed, clients
-- ARGV: id, entry ('' removes), expected version ('' any; 0 absent), max entries, epoch, max removed
local id = ARGV[1]
local current = tonumber(redis.call('ZSCORE', KEYS[2], id) or 0)
if ARGV[3] ~= '' and current ~= tonumber(ARGV[3]) then
  return {'conflict', current}
end
local exists = redis.call('HEXISTS', KEYS[4], id) == 1
if ARGV[2] == '' then
  if not exists then return {'absent', 0} end
elseif not exists and redis.call('HLEN', KEYS[4]) >= tonumber(ARGV[4]) then
  return {'full', 0}
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[5])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[3], version, id)
  local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[6])
  if extra > 0 then
    local newest = redis.call('ZRANGE', KEYS[3], extra - 1, extra - 1, 'WITHSCORES')
    redis.call('HSET', KEYS[1], 'trimmed', newest[2])
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, extra - 1)
  end
else
  redis.call('HSET', KEYS[4], id, ARGV[2])
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[2], version, id)
end
return {'ok', version}
"""

_POLL = """
-- KEYS: meta, changes, removed, clients
-- ARGV: version read last, epoch read last, most changes to answer
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'version', 'trimmed')
local epoch = meta[1] or ''
local version = tonumber(meta[2] or 0)
local trimmed = tonumber(meta[3] or 0)
local since = tonumber(ARGV[1])
if epoch ~= ARGV[2] or since > version or since < trimmed then
  return {'full', epoch, version, redis.call('HGETALL', KEYS[4])}
end
if since == version then
  return {'same', epoch, version}
end
local limit = tonumber(ARGV[3])
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. since, '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local entries = {}
for i = 1, #live, 2 do
  entries[#entries + 1] = redis.call('HGET', KEYS[4], live[i]) or ''
end
return {'changes', epoch, version, live, gone, entries}
"""

_GET = """
-- KEYS: changes, clients; ARGV: id
return {redis.call('HGET', KEYS[2], ARGV[1]) or '', tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or 0)}
"""


def registry_keys(prefix: str) -> tuple[str, str, str, str]:
    """The keys of the shared registry: meta, changes, removed, clients (one hash tag)."""
    base = f"{prefix}:registry:{{registry}}"
    return f"{base}:meta", f"{base}:changes", f"{base}:removed", f"{base}:clients"


@dataclass(frozen=True, slots=True)
class _Entry:
    """One client's Redis entry, decoded: `record` is the whole record ("record") or
    carries the dynamic fields ("state"); None when the entry is unreadable (refused)."""

    kind: str
    record: ClientRecord | None


@dataclass(frozen=True, slots=True)
class _Copy:
    """The shared state as last read, replaced whole (readers never lock)."""

    epoch: str
    version: int
    entries: Mapping[str, _Entry]
    read_at: float  # on the registry's clock; -inf: never read


def _encode(kind: str, record: ClientRecord) -> str:
    data = client_to_dict(record)
    if kind == _STATE:
        data = {name: value for name, value in data.items() if name in DYNAMIC_FIELDS}
    text = json.dumps({"v": 1, "kind": kind, "record": data}, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_ENTRY_BYTES:
        raise InvalidArgumentError(
            f"client {record.client_id!r} is too large for the shared registry (more than {MAX_ENTRY_BYTES} bytes): "
            "use a smaller key, or fewer audiences, scopes or networks"
        )
    return text


def _decode(client_id: str, text: str) -> _Entry:
    """An entry read from Redis; an unreadable one refuses its client (and is logged)."""
    try:
        if len(text) > MAX_ENTRY_BYTES:
            raise ValueError(f"larger than {MAX_ENTRY_BYTES} bytes")
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1 or data.get("kind") not in (_STATE, _RECORD):
            raise ValueError("not a version 1 entry of kind state or record")
        fields = data.get("record")
        if not isinstance(fields, dict):
            raise ValueError("its record is not an object")
        if data["kind"] == _STATE and not set(fields) <= set(DYNAMIC_FIELDS):
            raise ValueError(f"a state entry holds static fields {sorted(set(fields) - set(DYNAMIC_FIELDS))}")
        return _Entry(data["kind"], client_from_dict(client_id, fields, _SOURCE))
    except (ValueError, TypeError) as exc:  # RegistryFileError and JSON errors are ValueErrors
        log.error(
            "unreadable shared registry entry: the client is refused until it is written again "
            "(`tokenbroker clients approve`, `disable` or `remove` it)",
            client_id=client_id[:256],
            error=str(exc)[:300],
        )
        return _Entry(_STATE, None)


def _dynamic(record: ClientRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in DYNAMIC_FIELDS}


def _static(record: ClientRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in ClientRecord.__dataclass_fields__ if name not in DYNAMIC_FIELDS}


def _merged(file_record: ClientRecord | None, entry: _Entry | None) -> ClientRecord | None:
    """What a client is: its file record overlaid with its shared state (see module doc)."""
    if entry is None:
        return file_record
    if entry.record is None:
        return None  # unreadable: refused like an unknown client
    if file_record is None:
        return entry.record if entry.kind == _RECORD else None
    return dataclasses.replace(file_record, **_dynamic(entry.record))


def _readable(entry: _Entry | None) -> _Entry | None:
    """The entry, or None when it is unreadable: a change overwrites such an entry."""
    return entry if entry is not None and entry.record is not None else None


def _array(reply: object) -> list[Any]:
    """A registry script's array reply, or `ReplyError`."""
    if not isinstance(reply, list) or len(reply) < 2:
        raise ReplyError("unexpected reply from a registry script")
    return reply


def _unknown(client_id: str) -> str:
    return f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones"


class SharedRegistry(FileRegistry):
    """A `FileRegistry` whose clients' dynamic state is shared through Redis (module doc).
    It is a FileRegistry (servers, the file's path, static edits) so that every part of
    the broker written for the file takes it unchanged.

    `redis` is a sync redis-py client (the Redis store's: `for_store`; or its own:
    `connect`). `follow`: keep a copy up to date in a thread (serve); otherwise read Redis
    on each use (the CLI). `clock` (monotonic seconds) and `stale_after_seconds` decide
    when a copy is too old to trust."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        redis: SyncClient,
        *,
        prefix: str = "tb",
        follow: bool = True,
        poll_seconds: float = POLL_SECONDS,
        stale_after_seconds: float = STALE_AFTER_SECONDS,
        max_clients: int = MAX_SHARED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        owns_client: bool = False,
    ) -> None:
        super().__init__(path, clock=clock)
        if stale_after_seconds <= poll_seconds:
            raise ValueError("stale_after_seconds must be longer than poll_seconds")
        self._redis = redis
        self._prefix = prefix
        self._keys = registry_keys(prefix)
        self._put = redis.register_script(_PUT)
        self._poll = redis.register_script(_POLL)
        self._get = redis.register_script(_GET)
        self._follow = follow
        self._poll_seconds = poll_seconds
        self._stale_after = stale_after_seconds
        self._max_clients = max_clients
        self._shared_clock = clock
        self._owns_client = owns_client
        self._copy = _Copy("", 0, {}, float("-inf"))
        self._sync_lock = threading.Lock()
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.refresh()
        except StoreUnavailableError as exc:
            if not follow:
                raise
            log.error("shared registry not read yet; no client is let in until Redis answers", error=str(exc))
            self._failing = True
        if follow:
            self._thread = threading.Thread(target=self._follow_changes, name="tb-registry-sync", daemon=True)
            self._thread.start()

    # -- construction ----------------------------------------------------------------

    @classmethod
    def for_store(cls, path: str | os.PathLike[str], store: Store, **options: Any) -> SharedRegistry:
        """The shared registry on the Redis store's own client and key prefix (`serve`)."""
        client = getattr(store, "client", None)
        if client is None:
            raise TypeError("the shared registry needs the Redis store (redis_url)")
        return cls(path, client, prefix=str(getattr(store, "prefix", "tb")), **options)

    @classmethod
    def connect(cls, settings: Settings, **options: Any) -> SharedRegistry:
        """The shared registry of the deployment `settings` name (its `redis_url`), on a
        client of its own that checks `maxmemory-policy` as the store does (the CLI).
        Raises `StoreUnavailableError` when Redis cannot be read."""
        from tokenbroker.store.redis_connect import connect
        from tokenbroker.store.redis_eviction import EvictionGuard

        if not settings.redis_url:
            raise ValueError("the shared registry needs redis_url")
        guard = EvictionGuard(
            allow_unsafe=settings.redis_allow_unsafe_eviction, declared_policy=settings.redis_maxmemory_policy
        )
        client, _ = connect(
            settings.redis_url, cluster=settings.redis_cluster, timeout=2.0, read_timeout=2.0, checks=(guard,)
        )
        options.setdefault("follow", False)
        try:
            return cls(settings.registry_file, client, owns_client=True, **options)
        except BaseException:
            with contextlib.suppress(*STORE_ERRORS):
                client.close()
            raise

    def close(self) -> None:
        """Stops following changes (and closes the client it made itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owns_client:
            with contextlib.suppress(*STORE_ERRORS):
                self._redis.close()

    # -- reading the shared state ----------------------------------------------------

    def refresh(self) -> None:
        """Reads what changed in Redis since the last read. Raises `StoreUnavailableError`."""
        with self._sync_lock:
            copy = self._copy
            try:
                reply = self._poll(keys=self._keys, args=(copy.version, copy.epoch, _POLL_LIMIT))
                self._copy = self._apply(copy, reply)
            except TokenBrokerError:
                raise
            except _CALL_ERRORS as exc:
                raise unavailable("reading the shared client registry", exc) from exc

    def _apply(self, copy: _Copy, reply: Any) -> _Copy:
        if not isinstance(reply, list) or len(reply) < 3:
            raise ReplyError("unexpected reply to the registry poll")
        kind, epoch, version = reply_text(reply[0]), reply_text(reply[1]), int(reply[2])
        now = self._shared_clock()
        if kind == "same":
            return dataclasses.replace(copy, read_at=now)
        if kind == "full":
            pairs = reply_texts(reply[3])
            if len(pairs) // 2 > self._max_clients:
                raise StoreUnavailableError(
                    f"the shared client registry holds {len(pairs) // 2} clients, more than the {self._max_clients} "
                    "this broker keeps: remove pending clients (`tokenbroker clients remove ID`)"
                )
            if copy.epoch and epoch != copy.epoch:
                log.error(
                    "the shared client registry in Redis was lost or replaced (Redis restarted without its data?): "
                    "CIMD clients must be approved again; file clients are as their registry file says",
                    clients=len(pairs) // 2,
                )
            entries = {pairs[i]: _decode(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)}
            return _Copy(epoch, version, entries, now)
        live, gone, texts = reply_texts(reply[3]), reply_texts(reply[4]), reply_texts(reply[5])
        changed = dict(copy.entries)
        for i in range(0, len(gone), 2):
            changed.pop(gone[i], None)
        for i in range(0, len(live), 2):
            client_id, text = live[i], texts[i // 2]
            if text:
                changed[client_id] = _decode(client_id, text)
            else:  # removed after the change was listed: the next poll lists the removal
                changed.pop(client_id, None)
        if len(changed) > self._max_clients:
            raise StoreUnavailableError(
                f"the shared client registry holds more than the {self._max_clients} clients this broker keeps"
            )
        # Complete up to the last version of each list that was cut at the limit.
        cut = [int(float(lst[-1])) for lst in (live, gone) if len(lst) // 2 >= _POLL_LIMIT]
        return _Copy(epoch, min(cut) if cut else version, changed, now)

    def _follow_changes(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except StoreUnavailableError as exc:
                if not self._failing:
                    log.error(
                        "cannot read the shared client registry; using the last copy for a few seconds, then "
                        "refusing every client until Redis answers",
                        error=str(exc),
                        stale_after_seconds=self._stale_after,
                    )
                self._failing = True
                continue
            except Exception:  # a bug here must not stop the following: every read would then refuse
                log.exception("shared registry poll failed")
                continue
            if self._failing:
                log.info("shared client registry readable again")
                self._failing = False

    def _entries(self) -> Mapping[str, _Entry]:
        """The shared entries, fresh enough to decide on, or `StoreUnavailableError`."""
        copy = self._copy
        age = self._shared_clock() - copy.read_at
        if not self._follow:
            if age > _CLI_REFRESH_SECONDS:
                self.refresh()
            return self._copy.entries
        if age > self._stale_after:
            raise StoreUnavailableError(
                f"the shared client registry in Redis has not been read for more than {self._stale_after:g} s, so "
                "approvals made on other replicas cannot be seen: no client gets a token until Redis answers "
                "(check that Redis at redis_url is reachable)"
            )
        return copy.entries

    def _fetch(self, client_id: str) -> tuple[_Entry | None, int]:
        """The client's entry read from Redis now, and its version (0: none)."""
        try:
            reply = _array(self._get(keys=(self._keys[1], self._keys[3]), args=(client_id,)))
            text, version = reply_text(reply[0]), int(reply[1])
        except _CALL_ERRORS as exc:
            raise unavailable("reading the shared client registry", exc) from exc
        return (_decode(client_id, text) if text else None), version

    # -- the Registry protocol and listing -------------------------------------------

    def client(self, client_id: str) -> ClientRecord | None:
        """The file's record overlaid with the shared state (module doc). Raises
        `StoreUnavailableError` when the shared state is too old to decide on."""
        entries = self._entries()
        return _merged(super().client(client_id), entries.get(client_id))

    def clients(self) -> list[ClientRecord]:
        entries = self._entries()
        files = {record.client_id: record for record in super().clients()}
        ids = set(files) | {cid for cid, entry in entries.items() if entry.kind == _RECORD}
        merged = (_merged(files.get(cid), entries.get(cid)) for cid in sorted(ids))
        return [record for record in merged if record is not None]

    # -- changes ---------------------------------------------------------------------

    def _write(self, client_id: str, kind: str | None, record: ClientRecord | None, expected: int | None) -> bool:
        """Writes (kind and record) or removes (None) the entry; False when `expected` (a
        version, 0: absent) is no longer the entry's. Raises `StoreUnavailableError`, or
        `InvalidArgumentError` when the registry is full."""
        text = _encode(kind, record) if kind is not None and record is not None else ""
        args = (client_id, text, "" if expected is None else expected, self._max_clients)
        try:
            reply = _array(self._put(keys=self._keys, args=(*args, secrets.token_urlsafe(12), MAX_REMOVED)))
            outcome = reply_text(reply[0])
        except _CALL_ERRORS as exc:
            raise unavailable("writing the shared client registry", exc) from exc
        if outcome == "full":
            raise InvalidArgumentError(
                f"the shared client registry holds its maximum of {self._max_clients} clients: remove pending or "
                "disabled ones with `tokenbroker clients remove ID` before adding more"
            )
        if outcome == "conflict":
            return False
        with contextlib.suppress(StoreUnavailableError):  # the poll catches up otherwise
            self.refresh()
        return True

    def _home_is_redis(self, client_id: str) -> bool:
        """Whether the client's static part lives in Redis: a CIMD id that no file defines."""
        return is_cimd_client_id(client_id) and FileRegistry.client(self, client_id) is None

    def add_client(self, record: ClientRecord) -> None:
        """Registers a new client: a CIMD client no file defines in Redis only; any other
        in the file, its dynamic state in Redis. Raises `InvalidArgumentError` if the id
        is taken, `StoreUnavailableError` (nothing added) when Redis is down."""
        check_id("client", record.client_id)
        checked = checked_client(record)
        client_id = checked.client_id
        self.reload()  # the file as it is now, not as last read
        entry, version = self._fetch(client_id)
        if _merged(FileRegistry.client(self, client_id), _readable(entry)) is not None:
            raise InvalidArgumentError(
                f"client {client_id!r} already exists: change it with `tokenbroker clients update {client_id}` "
                f"or remove it with `tokenbroker clients remove {client_id}`"
            )
        if self._home_is_redis(client_id):
            if not self._write(client_id, _RECORD, checked, expected=version):
                raise InvalidArgumentError(f"client {client_id!r} was just registered elsewhere: see `clients show`")
            return
        super().add_client(checked)
        try:
            self._write(client_id, _STATE, checked, expected=None)
        except BaseException:
            super().remove_client(client_id)  # not registered without its shared state
            raise

    def put_client(self, record: ClientRecord) -> None:
        """Adds or replaces a client: its dynamic state in Redis first (so nothing is
        written when Redis is down), then its static part where it lives."""
        check_id("client", record.client_id)
        checked = checked_client(record)
        client_id = checked.client_id
        self.reload()  # the file as it is now, not as last read
        if self._home_is_redis(client_id):
            self._write(client_id, _RECORD, checked, expected=None)
            return
        self._write(client_id, _STATE, checked, expected=None)
        in_file = FileRegistry.client(self, client_id)
        if in_file is None or _static(in_file) != _static(checked):
            super().put_client(checked)

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Changes fields of a client; returns the new record. Dynamic fields change in
        Redis (a compare-and-set on the entry's version, retried), static ones where the
        client lives. Raises `InvalidArgumentError`, `StoreUnavailableError`."""
        if "client_id" in changes:
            raise InvalidArgumentError(f"cannot update client {client_id!r}: a client's id cannot change")
        static = {name: value for name, value in changes.items() if name not in DYNAMIC_FIELDS}
        self.reload()  # the file as it is now, not as last read
        for _ in range(_CAS_ATTEMPTS):
            entry, version = self._fetch(client_id)
            in_file = FileRegistry.client(self, client_id)
            current = _merged(in_file, _readable(entry))
            if current is None:
                raise InvalidArgumentError(_unknown(client_id))
            try:
                updated = checked_client(dataclasses.replace(current, **changes))
            except TypeError as exc:
                raise InvalidArgumentError(f"cannot update client {client_id!r}: {exc}") from None
            if in_file is None:  # the whole record lives in Redis
                if self._write(client_id, _RECORD, updated, expected=version):
                    return updated
                continue
            if len(static) < len(changes) and not self._write(client_id, _STATE, updated, expected=version):
                continue
            if static:
                super().update_client(client_id, **static)
            return updated
        raise StoreUnavailableError(
            f"client {client_id!r} kept changing in the shared registry while this change was made: try again"
        )

    def remove_client(self, client_id: str) -> None:
        """Removes the client from the file (when it is there) and its shared entry."""
        self.reload()
        entry, _ = self._fetch(client_id)
        in_file = FileRegistry.client(self, client_id)
        if in_file is None and entry is None:
            raise InvalidArgumentError(_unknown(client_id))
        if in_file is not None:
            super().remove_client(client_id)
        if entry is not None:
            self._write(client_id, None, None, expected=None)

    def __repr__(self) -> str:
        return f"SharedRegistry({str(self.path)!r}, prefix={self._prefix!r})"


__all__ = ["DYNAMIC_FIELDS", "MAX_SHARED_CLIENTS", "SharedRegistry", "registry_keys"]
