"""Assembles a broker from `Settings`: keys, state store, registry, client authentication,
audit log, events and metrics. `tokenbroker serve` hands these to the gRPC service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import structlog

from tokenbroker.attestation import Attesters
from tokenbroker.audit import AuditLog
from tokenbroker.broker import Broker
from tokenbroker.cimd import CimdFetcher
from tokenbroker.cimd_clients import CimdClients
from tokenbroker.client_auth import ClientAuthenticator
from tokenbroker.config import Settings
from tokenbroker.detection.detector import Detection, parse_actions
from tokenbroker.detection.signals import Action, Signal
from tokenbroker.errors import InvalidKeyError
from tokenbroker.events import Events, Sink, Source
from tokenbroker.events_sinks import AuditSink
from tokenbroker.keyring import Keyring
from tokenbroker.metrics import Metrics
from tokenbroker.models import SessionLimit
from tokenbroker.registry_file import FileRegistry
from tokenbroker.store.base import Store
from tokenbroker.store.memory import MemoryStore

log = structlog.get_logger("tokenbroker")


@dataclass(slots=True)
class Components:
    broker: Broker
    registry: FileRegistry
    authenticator: ClientAuthenticator
    audit: AuditLog
    metrics: Metrics
    settings: Settings
    events: Events
    attesters: Attesters | None
    store_kind: str = "memory"  # "memory", "redis" or "redis-cluster", for the startup line


def load_keyring(settings: Settings) -> Keyring:
    """The signing keys: `key_file` when it exists; a new key saved there when it does
    not; an ephemeral key (with a warning) when no file is configured."""
    path = settings.key_file
    if path is None:
        log.warning(
            "no key_file configured: signing with an ephemeral key; tokens stop validating when the broker "
            "restarts (set key_file or TOKENBROKER_KEY_FILE)"
        )
        return Keyring.generate()
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("key file is readable by others: run chmod 600 on it", key_file=str(path))
        try:
            return Keyring.load(path)
        except (ValueError, UnicodeDecodeError) as exc:  # InvalidKeyError and JSON errors are ValueErrors
            raise InvalidKeyError(
                f"key file {path} holds no usable signing key ({exc}): create one with "
                f"`tokenbroker keys generate --out {path}`"
            ) from None
    keyring = Keyring.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    keyring.save(path)
    log.info("generated a signing key", key_file=str(path), kid=keyring.active_kid)
    return keyring


def build_store(settings: Settings) -> tuple[Store, str]:
    if not settings.redis_url:
        return MemoryStore(max_replay_records_per_client=settings.max_replay_records_per_client), "memory"
    # Imported on use: the embedded mode never loads the Redis client.
    from tokenbroker.store.redis import RedisStore

    # from_url checks maxmemory-policy and creates the state epochs now (a failure is
    # logged and every call fails closed, naming the fix, until Redis is safe).
    store: Store = RedisStore.from_url(
        settings.redis_url,
        cluster=settings.redis_cluster,
        allow_unsafe_eviction=settings.redis_allow_unsafe_eviction,
        declared_maxmemory_policy=settings.redis_maxmemory_policy,
        min_replicas=settings.redis_min_replicas,
        replica_timeout_ms=settings.redis_replica_timeout_ms,
        max_clock_skew_seconds=settings.max_clock_skew_seconds,
        max_records_per_client=settings.max_replay_records_per_client,
    )
    return store, "redis-cluster" if settings.redis_cluster else "redis"


def cimd_fetcher(settings: Settings) -> CimdFetcher:
    """The guarded fetcher of client metadata documents, as the settings say."""
    return CimdFetcher(ca_file=settings.cimd_ca_file, allow_loopback=settings.cimd_allow_loopback)


def build_attesters(settings: Settings) -> Attesters | None:
    """Who may attest workloads (the `attesters` setting), or None when nobody may. Bundles
    at https URLs come through the guarded fetcher (SPIFFE bundles may be large: 1 MiB)."""
    if not settings.attesters:
        return None
    fetcher = CimdFetcher(ca_file=settings.cimd_ca_file, allow_loopback=settings.cimd_allow_loopback, max_bytes=1 << 20)

    async def fetch_jwks(url: str) -> bytes:
        return (await fetcher.fetch(url, approved=True)).body

    return Attesters.from_setting(settings.attesters, fetch_jwks=fetch_jwks)


def _governance_event(events: Events, found: dict[str, Any]) -> None:
    """An authenticator's finding (an expired approval or key) as an event."""
    details = dict(found)
    name = str(details.pop("event", "governance"))
    client_id = str(details.pop("client_id", ""))
    events.emit(name, client_id=client_id, action="deny", evidence=details)


def build_events(settings: Settings, audit: AuditLog, metrics: Metrics) -> Events:
    """Where events go (`tokenbroker.events`): the log line and the audit line always;
    with `redis_url`, the Redis stream every replica writes and WatchEvents reads (so a
    broker shows its siblings' events too); with `events_webhook_url`, the webhook."""
    sinks: list[Sink] = [AuditSink(audit)]
    source: Source | None = None
    if settings.redis_url:
        from tokenbroker.events_redis import RedisEventStream

        stream = RedisEventStream.from_url(
            settings.redis_url, cluster=settings.redis_cluster, max_len=settings.events_stream_max
        )
        sinks.append(stream)
        source = stream
    if settings.events_webhook_url:
        from tokenbroker.events_webhook import WebhookSink

        sinks.append(
            WebhookSink(
                settings.events_webhook_url,
                retries=settings.events_webhook_retries,
                on_dropped=metrics.event_dropped,
            )
        )
    return Events(
        keep=settings.events_keep,
        sinks=sinks,
        source=source,
        on_dropped=metrics.event_dropped,
        count=metrics.detection,
    )


def build_registry(settings: Settings, store: Store) -> FileRegistry:
    """The client and server registry: the file, with the dynamic state (pending clients,
    approvals, pins) shared by every replica when the store is Redis."""
    if settings.redis_url:
        from tokenbroker.registry_shared import SharedRegistry

        return SharedRegistry.for_store(settings.registry_file, store)
    return FileRegistry(settings.registry_file)


def build_detection(
    settings: Settings, registry: FileRegistry, events: Events, metrics: Metrics
) -> Detection | Literal[False]:
    """What watches validations (`detection` setting), with the broker-wide actions and each
    client record's own."""
    if not settings.detection:
        return False

    def client_actions(client_id: str) -> dict[Signal, Action] | None:
        record = registry.client(client_id)
        return record.detection_policy() if record is not None else None

    return Detection(
        thresholds=settings.thresholds(),
        actions=parse_actions(settings.detection_actions, "detection_actions"),
        client_actions=client_actions,
        events=events,
        on_finding=metrics.detection,
        learn_usage_window=settings.detection_learn_usage_window,
    )


def build_components(settings: Settings, *, keyring: Keyring | None = None) -> Components:
    """Everything `serve` needs, built from `settings`; `keyring`, when given, instead of
    `load_keyring(settings)` (a worker of `serve --workers` signs with its parent's keys).
    Raises `TokenBrokerError` subclasses (bad key file, bad registry file) and `OSError`
    with clear messages."""
    keyring = keyring if keyring is not None else load_keyring(settings)
    store, store_kind = build_store(settings)
    registry = build_registry(settings, store)
    metrics = Metrics()
    audit = AuditLog(
        settings.audit_file,
        refusal_burst=settings.audit_refusal_burst,
        refusal_rate=settings.audit_refusals_per_second,
        on_suppressed=metrics.audit_suppressed,
    )
    events = build_events(settings, audit, metrics)
    broker = Broker(
        keyring,
        issuer=settings.issuer_url,
        store=store,
        default_ttl_seconds=settings.default_ttl_seconds,
        session_ttl_seconds=settings.session_ttl_seconds,
        session_limit=SessionLimit(settings.max_sessions),
        session_idle_seconds=settings.session_idle_seconds,
        detection=build_detection(settings, registry, events, metrics),
    )
    cimd = CimdClients(
        registry,
        cimd_fetcher(settings),
        events,
        trusted_domains=settings.cimd_trusted_domains,
        approval_ttl_days=settings.approval_ttl_days,
        default_audiences=settings.cimd_default_audiences,
        default_scopes=settings.cimd_default_scopes,
        max_sessions=settings.max_sessions,
    )
    authenticator = ClientAuthenticator(
        registry,
        store,
        assertion_audience=settings.issuer_url,
        client_failure_burst=settings.client_auth_failure_burst,
        client_failures_per_second=settings.client_auth_failures_per_minute / 60,
        source_failure_burst=settings.source_auth_failure_burst,
        source_failures_per_second=settings.source_auth_failures_per_minute / 60,
        failure_table_size=settings.auth_failure_table_size,
        key_max_age_seconds=settings.client_key_max_age_days * 86_400 if settings.client_key_max_age_days else None,
        on_event=lambda found: _governance_event(events, found),
        cimd=cimd,
    )
    if hasattr(store, "observed_clock_skew"):  # the Redis store: its clock against ours
        metrics.watch_redis_clock(store)
    attesters = build_attesters(settings)
    return Components(broker, registry, authenticator, audit, metrics, settings, events, attesters, store_kind)


__all__ = [
    "Components",
    "build_components",
    "build_detection",
    "build_events",
    "build_registry",
    "build_store",
    "load_keyring",
]
