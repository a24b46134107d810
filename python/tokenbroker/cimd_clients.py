"""Clients whose `client_id` is an `https://` URL naming a Client ID Metadata Document
(MCP 2025-11-25): the document is fetched (`tokenbroker.cimd`, SSRF-guarded) and checked,
and the registry records what was decided about it.

- An unknown URL is recorded `pending` with the document's key thumbprints and refused;
  a `client_pending` event says so. `tokenbroker clients approve URL` approves it and pins
  the document's keys at that moment.
- A host that matches `cimd_trusted_domains` is approved at once (rule
  `trusted_domain:<pattern>`, approver `policy`), and pinned all the same.
- When an approved client's document later lists a different key set, the client goes
  back to `pending` and `client_document_changed` fires: a compromised publishing
  workflow cannot swap keys silently. A key removed from the document stops working with
  the next fetch of it (the cache follows the document's max-age, at most 24 h).
- Only keys that are both in the current document and pinned verify an assertion.
- A failing fetch never locks out an approved client while its last good document is
  usable (the fetcher keeps it); an unknown client is never recorded without a document.

Pending records are bounded (`max_pending`): beyond it new URLs are refused without being
recorded, so made-up documents cannot grow the registry."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

from tokenbroker.cimd import CimdFetcher, ClientDocument, load_client_document, trusted_domain_rule
from tokenbroker.events import CLIENT_DOCUMENT_CHANGED, CLIENT_PENDING, Events
from tokenbroker.registry import Binding, ClientRecord, ClientStatus
from tokenbroker.registry_file import FileRegistry

POLICY_APPROVER = "policy"
DAY = 86_400


def is_cimd_client_id(client_id: str) -> bool:
    return client_id.startswith("https://")


class CimdClients:
    """The registry's view of CIMD clients (see module doc)."""

    def __init__(
        self,
        registry: FileRegistry,
        fetcher: CimdFetcher,
        events: Events,
        *,
        trusted_domains: Sequence[str] = (),
        approval_ttl_days: int = 90,
        default_audiences: Sequence[str] = (),
        default_scopes: Sequence[str] = (),
        max_sessions: int = 10,
        max_pending: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.fetcher = fetcher
        self._events = events
        self._trusted = tuple(trusted_domains)
        self._ttl = approval_ttl_days * DAY
        self._audiences = tuple(default_audiences)
        self._scopes = tuple(default_scopes)
        self._max_sessions = max_sessions
        self._max_pending = max_pending
        self._clock = clock

    async def document(self, client_id: str, *, refresh: bool = False) -> ClientDocument:
        """The client's checked document (raises `CimdFetchError` / `CimdDocumentError`)."""
        known = self.registry.client(client_id)
        approved = known is not None and known.status is ClientStatus.APPROVED
        return await load_client_document(self.fetcher, client_id, approved=approved, refresh=refresh)

    async def record_for(self, client_id: str) -> tuple[ClientRecord, ClientDocument]:
        """The client's record as decided now, and its document. The record may be pending
        (the authenticator refuses it, naming the command that approves it)."""
        document = await self.document(client_id)
        record = self.registry.client(client_id)
        now = int(self._clock())
        pins = tuple(sorted(document.thumbprints))
        if record is None or self._changed(record, document):
            # About to write: decide on the registry as it is now, not on the snapshot of up
            # to a second ago, so an approval the CLI just made is not overwritten.
            await asyncio.to_thread(self.registry.reload)
            record = self.registry.client(client_id)
        if record is None:
            return self._first_sight(client_id, document, pins, now), document
        if self._changed(record, document):
            changed = dataclasses.replace(
                record,
                status=ClientStatus.PENDING,
                document_fingerprint=document.fingerprint,
                document_domain=document.domain,
            )
            await self._save(changed)
            self._events.emit(
                CLIENT_DOCUMENT_CHANGED,
                client_id=client_id,
                action="deny",
                severity="critical",
                evidence={
                    "pinned": list(record.pinned_thumbprints),
                    "document": list(pins),
                    "document_fingerprint": document.fingerprint,
                },
            )
            return changed, document
        return record, document

    @staticmethod
    def _changed(record: ClientRecord, document: ClientDocument) -> bool:
        """An approved client whose document no longer lists exactly its pinned keys."""
        return record.status is ClientStatus.APPROVED and frozenset(record.pinned_thumbprints) != document.thumbprints

    async def _save(self, record: ClientRecord) -> None:
        """Records `record` off the event loop: the registry writes a file (fsync) or,
        shared between replicas, Redis (`registry_shared`), and neither may stall the door."""
        await asyncio.to_thread(self.registry.put_client, record)

    def _first_sight(self, client_id: str, document: ClientDocument, pins: tuple[str, ...], now: int) -> ClientRecord:
        """The record a new client would get (approved on a trusted domain, else pending),
        NOT recorded yet: only once its assertion verified with one of the document's keys
        (`record_new`), so nobody fills the registry with documents they cannot sign for."""
        rule = trusted_domain_rule(document.domain, self._trusted)
        base = ClientRecord(
            client_id,
            pinned_thumbprints=pins,
            document_fingerprint=document.fingerprint,
            document_domain=document.domain,
            allowed_audiences=self._audiences,
            allowed_scopes=self._scopes,
            max_sessions=self._max_sessions,
            binding=Binding.DPOP,
        )
        if rule is not None:
            record = dataclasses.replace(
                base,
                status=ClientStatus.APPROVED,
                approved_by=POLICY_APPROVER,
                approved_at=now,
                approved_until=now + self._ttl,
                approval_rule=f"trusted_domain:{rule}",
            )
            return record
        return base

    def is_new(self, record: ClientRecord) -> bool:
        """Whether `record` is a first sight that `record_new` has not recorded yet."""
        return self.registry.client(record.client_id) is None

    async def record_new(self, record: ClientRecord) -> None:
        """Records a first sight whose assertion verified: approved (trusted domain) or
        pending (with a `client_pending` event); pending ones up to `max_pending`."""
        if record.status is ClientStatus.PENDING:
            pending = sum(1 for c in self.registry.clients() if c.status is ClientStatus.PENDING)
            if pending >= self._max_pending:
                return  # refused as pending, not recorded: the registry does not grow past its bound
        await self._save(record)
        if record.status is ClientStatus.PENDING:
            self._events.emit(
                CLIENT_PENDING,
                client_id=record.client_id,
                action="deny",
                evidence={
                    "document_domain": record.document_domain,
                    "document_fingerprint": record.document_fingerprint,
                },
            )

    def pinned_keys(self, record: ClientRecord, document: ClientDocument) -> list[dict[str, str]]:
        """The document's keys that are pinned: the only ones that may sign for it."""
        from tokenbroker.cimd import jwk_thumbprint

        pinned = frozenset(record.pinned_thumbprints)
        return [key for key in document.keys if jwk_thumbprint(key) in pinned]


__all__ = ["POLICY_APPROVER", "CimdClients", "is_cimd_client_id"]
