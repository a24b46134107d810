"""`Settings`: the broker's configuration. Sources, strongest first: explicit values (CLI
options), `TOKENBROKER_*` environment variables, the TOML file given by `--config`, the
defaults below. The TOML file holds the same names at top level:

    listen = "0.0.0.0:50051"
    http_listen = "0.0.0.0:8080"
    public_url = "https://broker.example"
    redis_url = "redis://redis:6379/0"
    key_file = "/etc/tokenbroker/keys.json"

Relative paths are relative to the working directory."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tokenbroker._core import LIMITS
from tokenbroker.detection.signals import Thresholds
from tokenbroker.errors import InvalidArgumentError

ENV_PREFIX = "TOKENBROKER_"


def default_max_workers() -> int:
    """Threads for registered servers' unary calls: two per CPU this process may run on,
    4 to 64. More threads than that only contend for the GIL: measured on 2 cores, unary
    ValidateToken at 16 calls in flight, 4 threads against 32 took the broker's CPU per
    request from 336 to 249 us (memory store) and 540 to 452 us (Redis store), and its
    throughput up by 38 % and 20 %; the do-nothing grpcio server went from 169 to 144 us."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(4, min(64, 2 * cpus))


# The engine's bound (rust/core claims.rs), exported once: settings describe it, Rust checks it.
MAX_TTL_SECONDS = LIMITS.max_lifetime_seconds
_config_file: ContextVar[Path | None] = ContextVar("tokenbroker_config_file", default=None)


class ConfigError(InvalidArgumentError):
    """The configuration is unusable; the message names the setting and how to fix it."""


class Settings(BaseSettings):
    """Every setting of the broker. Load with `Settings.load(config_file)`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    listen: str = Field("127.0.0.1:50051", description="host:port the gRPC server binds")
    workers: int = Field(
        1, ge=1, le=64, description="broker processes sharing the listen port (SO_REUSEPORT); above 1 needs redis_url"
    )
    http_listen: str = Field(
        "127.0.0.1:8080", description="host:port of the OAuth HTTP server (metadata, /token, ...); empty: no HTTP"
    )
    public_url: str | None = Field(
        None,
        description="THE issuer: the tokens' iss, the metadata's issuer, the aud of client assertions and what MCP "
        "servers name in authorization_servers (default: http://<http_listen>)",
    )
    issuer: str | None = Field(None, description="the older name of public_url: set one of them")
    session_idle_seconds: int = Field(
        1800, ge=60, le=30 * 24 * 3600, description="a session with no token request or validation this long ends"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or CIDRs of the gateways whose X-Forwarded-For / X-Real-IP (and Envoy's source "
        "address) name the client; anyone else is judged by the address it connects from",
    )
    cimd_trusted_domains: list[str] = Field(
        default_factory=list,
        description="hosts (exact or '*.suffix') whose Client ID Metadata Document clients are approved at once",
    )
    cimd_allow_loopback: bool = Field(
        False, description="let a client metadata document live on 127.0.0.1/localhost (tests, local development)"
    )
    cimd_ca_file: Path | None = Field(None, description="an extra CA bundle for client metadata document fetches")
    cimd_default_audiences: list[str] = Field(
        default_factory=list, description="what a new CIMD client may get tokens for until the operator says more"
    )
    cimd_default_scopes: list[str] = Field(default_factory=list, description="the scopes a new CIMD client may get")
    attesters: dict[str, str] = Field(
        default_factory=dict,
        description="trust domain = JWKS or SPIFFE bundle file, or https URL: who may attest workloads (jwt-bearer)",
    )
    approval_ttl_days: int = Field(
        90, ge=1, le=3650, description="how long a client approval lasts; then the client is pending again"
    )
    client_key_max_age_days: int | None = Field(
        None, ge=1, le=3650, description="a client key older than this is refused until rotated; none: no limit"
    )
    require_dpop_nonce: bool = Field(
        False, description="the token endpoint asks every DPoP client for a nonce (RFC 9449 section 8)"
    )
    dpop_nonce_window_seconds: int = Field(
        300, ge=10, le=86_400, description="how long a DPoP nonce is current (it is accepted for twice that)"
    )
    # Detection (tokenbroker.detection.signals says what each signal watches).
    detection: bool = Field(True, description="watch every validation for signs of impersonation (OWASP T40)")
    detection_actions: dict[str, str] = Field(
        default_factory=dict,
        description="signal -> alert, deny or revoke_session for every client (a client record overrides it); "
        "unset signals alert",
    )
    detection_learning_hours: int = Field(
        24, ge=0, le=24 * 90, description="a new client's first hours, when new_network stays quiet (0: none)"
    )
    detection_network_history_days: int = Field(
        30, ge=1, le=365, description="how long a client's networks are remembered (new_network)"
    )
    detection_network_history_max: int = Field(64, ge=1, le=4096, description="networks remembered per client")
    detection_concurrent_window_seconds: int = Field(
        300, ge=1, le=86_400, description="two non-adjacent networks in one session this close: concurrent_origins"
    )
    detection_breadth_min_sessions: int = Field(
        10, ge=1, le=100_000, description="sessions a client needs before resource_breadth judges its breadth"
    )
    detection_breadth_min_resources: int = Field(
        8, ge=1, le=64, description="resource_breadth never fires at or below this many distinct resources"
    )
    detection_burst_window_seconds: int = Field(
        10, ge=1, le=3600, description="how long after a session opens burst_after_auth counts its requests"
    )
    detection_burst_requests: int = Field(
        60, ge=1, le=1_000_000, description="more requests than this in the burst window: burst_after_auth"
    )
    detection_learn_usage_window: bool = Field(
        True, description="tokens of clients without a usage window carry one learned from their hours"
    )
    redis_url: str | None = Field(None, description="redis:// or rediss:// URL; none: embedded in-memory store")
    redis_cluster: bool = Field(False, description="connect to a Redis Cluster")
    redis_allow_unsafe_eviction: bool = Field(
        False, description="serve although Redis may evict keys (revocations and replay records can be lost)"
    )
    redis_maxmemory_policy: str | None = Field(
        None, description="the Redis maxmemory-policy, stated where CONFIG is disabled (managed Redis)"
    )
    redis_min_replicas: int = Field(
        0, ge=0, le=64, description="replicas that must acknowledge security writes (WAIT); 0: do not wait"
    )
    redis_replica_timeout_ms: int = Field(100, ge=1, le=60_000, description="how long a write waits for replicas")
    max_clock_skew_seconds: int = Field(
        30, ge=0, le=300, description="clock skew allowed between brokers and Redis; replay records outlive it"
    )
    max_replay_records_per_client: int = Field(
        500_000,
        ge=1,
        le=100_000_000,
        description="single-use records (proofs, assertions) kept per client: ~7,000 proofs/s sustained each",
    )
    key_file: Path | None = Field(None, description="signing keys (JWKS or PEM); none: an ephemeral key")
    registry_file: Path = Field(Path("tokenbroker-registry.toml"), description="the clients and servers")
    default_ttl_seconds: int = Field(300, ge=1, le=MAX_TTL_SECONDS, description="token lifetime when not asked")
    session_ttl_seconds: int = Field(8 * 3600, ge=60, le=30 * 24 * 3600, description="session lifetime")
    max_sessions: int = Field(10, ge=1, le=100_000, description="default concurrent sessions per new client")
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="CA that signs the MCP servers' client certificates")
    tls_require_client_cert: bool = False
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; none: off")
    metrics_host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_json: bool = True
    audit_file: Path | None = Field(None, description="audit log (JSON lines); none: the structured log on stderr")
    grace_seconds: float = Field(5.0, ge=0, le=300, description="how long shutdown waits for in-flight RPCs")
    # Admission control (tokenbroker.service.admission): each call class has its own threads.
    max_workers: int = Field(
        default_factory=default_max_workers,
        ge=1,
        le=1024,
        description="threads for registered MCP servers' unary calls (default: two per CPU, 4 to 64)",
    )
    max_queued_rpcs: int = Field(
        256, ge=0, le=100_000, description="registered servers' calls waiting for a thread; more: RESOURCE_EXHAUSTED"
    )
    max_streams: int = Field(16, ge=1, le=1024, description="registered servers' open streams (one thread each)")
    anonymous_workers: int = Field(
        8, ge=1, le=256, description="threads for calls without a server credential (IssueToken, GetJwks, ...)"
    )
    max_queued_anonymous_rpcs: int = Field(
        64, ge=0, le=10_000, description="anonymous calls waiting for a thread; more: RESOURCE_EXHAUSTED"
    )
    max_anonymous_streams: int = Field(8, ge=1, le=1024, description="open streams without a server credential")
    max_anonymous_per_source: int = Field(
        4, ge=1, le=1024, description="anonymous calls one address may have waiting for their message, or streams"
    )
    health_workers: int = Field(2, ge=1, le=64, description="threads for health Check, apart from everything else")
    message_timeout_seconds: float = Field(
        2.0, gt=0, le=300, description="a call's request message must arrive within this; else it is dropped"
    )
    stream_idle_timeout_seconds: float = Field(
        300.0, gt=0, le=86_400, description="a registered server's stream with no request for this long is ended"
    )
    max_concurrent_rpcs: int = Field(
        0,
        ge=0,
        le=100_000,
        description="gRPC calls active at once in this process, of every class (running or waiting for a "
        "thread); more are refused by grpc before any handler runs (RESOURCE_EXHAUSTED, cheaper under "
        "overload; health checks too); above the anonymous and health bounds' sum; 0: only the class bounds",
    )
    # Load shedding at the HTTP door (tokenbroker.http.overload).
    http_max_inflight: int = Field(
        64,
        ge=1,
        le=100_000,
        description="HTTP requests the door serves at once (/healthz aside); more are answered at once with 503 "
        "temporarily_unavailable and Retry-After: 1, so an admitted request waits behind at most this many",
    )
    reflection: bool = Field(False, description="serve gRPC server reflection (it lists the whole API to anyone)")
    client_auth_failure_burst: int = Field(
        20, ge=1, le=1_000_000, description="failed client authentications per client id before RESOURCE_EXHAUSTED"
    )
    client_auth_failures_per_minute: float = Field(
        30.0, ge=0, le=1_000_000, description="how fast a client id's failure allowance refills"
    )
    source_auth_failure_burst: int = Field(
        100, ge=1, le=1_000_000, description="failed client authentications per source address (IPv6: per /64)"
    )
    source_auth_failures_per_minute: float = Field(
        300.0, ge=0, le=1_000_000, description="how fast a source address's failure allowance refills"
    )
    auth_failure_table_size: int = Field(
        10_000, ge=1, le=10_000_000, description="client ids and addresses tracked for failed authentications"
    )
    audit_refusal_burst: int = Field(
        200, ge=1, le=1_000_000, description="audit lines for unauthenticated refusals written before sampling"
    )
    audit_refusals_per_second: float = Field(
        20.0, ge=0, le=1_000_000, description="steady rate of audit lines for unauthenticated refusals"
    )
    # Where events go (tokenbroker.events): the log and audit lines always, these besides.
    events_keep: int = Field(
        10_000, ge=1, le=1_000_000, description="events kept in memory for WatchEvents (without redis_url)"
    )
    events_stream_max: int = Field(
        10_000, ge=1, le=10_000_000, description="events kept in the Redis stream every replica reads (about)"
    )
    events_webhook_url: str | None = Field(
        None, description="http(s) URL each event is POSTed to as JSON; none: no webhook"
    )
    events_webhook_retries: int = Field(
        3, ge=0, le=10, description="retries of a failed webhook POST (after 0.2 s, 0.4 s, ...); then dropped"
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:50051 or [::]:50051")

    @field_validator("http_listen")
    @classmethod
    def _check_http_listen(cls, value: str) -> str:
        return value if value == "" else _host_port(value, "127.0.0.1:8080 or [::]:8080")

    @field_validator("issuer", "public_url")
    @classmethod
    def _check_issuer(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if value != value.strip() or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL without surrounding spaces, e.g. https://broker.example")
        if parts.query or parts.fragment or "#" in value or "?" in value:
            raise ValueError("must have no query or fragment (RFC 8414 section 2: it is the issuer identifier)")
        return value

    @field_validator("detection_actions")
    @classmethod
    def _detection_actions(cls, value: dict[str, str]) -> dict[str, str]:
        from tokenbroker.detection.detector import parse_actions

        parse_actions(value, "detection_actions")  # ValueError names the bad entry
        return value

    def thresholds(self) -> Thresholds:
        """The detection thresholds these settings give."""
        return Thresholds(
            network_history_days=self.detection_network_history_days,
            network_history_max=self.detection_network_history_max,
            learning_seconds=self.detection_learning_hours * 3600,
            concurrent_window_seconds=self.detection_concurrent_window_seconds,
            breadth_min_sessions=self.detection_breadth_min_sessions,
            breadth_min_resources=self.detection_breadth_min_resources,
            burst_window_seconds=self.detection_burst_window_seconds,
            burst_requests=self.detection_burst_requests,
        )

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        from tokenbroker.gateway.proxies import check_proxies

        return check_proxies(value)

    @field_validator("cimd_trusted_domains")
    @classmethod
    def _check_trusted_domains(cls, value: list[str]) -> list[str]:
        from tokenbroker.cimd import check_trusted_domains

        return list(check_trusted_domains(value))

    @model_validator(mode="after")
    def _one_issuer(self) -> Settings:
        """`public_url` and `issuer` are one string: whichever is set, or both when equal."""
        if self.public_url is not None and self.issuer is not None and self.public_url != self.issuer:
            raise ValueError(
                f"public_url {self.public_url!r} and issuer {self.issuer!r} differ: they are the same thing (the "
                "issuer); set only public_url"
            )
        url = self.public_url or self.issuer or f"http://{self.http_listen or self.listen}"
        self.public_url = self.issuer = url
        return self

    def with_http_port(self, port: int) -> Settings:
        """These settings once the HTTP door is bound to `port`: when `public_url` is the
        default and `http_listen` asked for any port (":0"), the issuer names the port
        bound, so tokens, metadata and assertions agree with where clients connect."""
        # A public URL naming port 0 is never one a client could use: it is the default.
        if not (self.http_listen.endswith(":0") and self.public_url == f"http://{self.http_listen}"):
            return self
        url = f"http://{self.http_listen.rpartition(':')[0]}:{port}"
        return self.model_copy(update={"public_url": url, "issuer": url})

    @property
    def issuer_url(self) -> str:
        """The issuer (`public_url`), always set once the settings validated."""
        return self.public_url or f"http://{self.http_listen or self.listen}"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("events_webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        from tokenbroker.events_webhook import check_webhook_url

        return check_webhook_url(value)  # ValueError never repeats the URL: it may hold a secret

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both (TLS) or neither (plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (mTLS runs over TLS)")
        if self.tls_require_client_cert and self.tls_client_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_client_ca_file to check the certificates against")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))

    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        """Settings from `overrides` (None values ignored), the environment and the TOML
        `config_file`. Raises `ConfigError` with one line per problem."""
        values = {k: v for k, v in overrides.items() if v is not None}
        path = Path(config_file) if config_file is not None else None
        if path is not None and not path.is_file():
            raise ConfigError(f"config file {path} does not exist: check the --config path")
        try:
            with _reading(path):
                return cls(**values)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except ValidationError as exc:
            raise ConfigError(_explain(exc, path)) from None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "events_webhook_url" and value:
                from tokenbroker.events_webhook import origin_of

                value = f"{origin_of(value)}/..."  # its path, query or user part may be the secret
            yield name, (_mask_password(value) if name == "redis_url" and value else value)

    def public_summary(self) -> dict[str, Any]:
        """What is safe to log at startup: no secrets (a Redis URL may hold a password)."""
        return {
            "listen": self.listen,
            "public_url": self.public_url,
            "http_listen": self.http_listen or None,
            "store": ("redis-cluster" if self.redis_cluster else "redis") if self.redis_url else "memory",
            "tls": self.tls_cert_file is not None,
            "mtls": self.tls_client_ca_file is not None,
            "registry_file": str(self.registry_file),
            "metrics_port": self.metrics_port,
        }


def _host_port(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be host:port, e.g. {example}")
    return value


def _mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _bounds(name: str) -> str:
    """The allowed range ("1 to 3600") of a field declared with ge and le; "" otherwise."""
    field = Settings.model_fields.get(name)
    if field is None:
        return ""
    low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
    if low is None or high is None:
        return ""
    return f"{low} to {high}"


@contextmanager
def _reading(path: Path | None) -> Iterator[None]:
    token = _config_file.set(path)
    try:
        yield
    finally:
        _config_file.reset(token)


def _explain(exc: ValidationError, path: Path | None) -> str:
    where = f"{path} or {ENV_PREFIX}* environment variables" if path else f"{ENV_PREFIX}* environment variables"
    problems = []
    for error in exc.errors():
        name = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {name!r} (in {where}): check its spelling")
        elif name == "settings":
            problems.append(f"invalid settings: {message}")
        else:
            bounds = _bounds(name)
            if bounds and error["type"] in ("greater_than_equal", "less_than_equal"):
                message = f"{error['input']!r} is out of range: use {bounds}"
            problems.append(f"invalid setting {name} ({ENV_PREFIX}{name.upper()}): {message}")
    return "; ".join(problems)


__all__ = ["ConfigError", "Settings"]
