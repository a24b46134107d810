"""Who may do what: the registered MCP clients (who may get tokens) and the registered MCP
servers (who may validate them, for which audiences). Shared contract between the
registry implementation, issuance and the gRPC service."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tokenbroker.detection.detector import parse_actions, parse_window
from tokenbroker.detection.signals import Action, Signal
from tokenbroker.models import LimitPolicy, SessionLimit


class ClientStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DISABLED = "disabled"


class Binding(enum.StrEnum):
    """What a client's tokens are bound to. `dpop`: the client's DPoP key (RFC 9449), so
    it asks with `dpop_jkt`; `mtls`: its client certificate (RFC 8705, `cert_thumbprint`);
    `bearer`: nothing, for clients that cannot sign proofs (still short-lived, audience-
    and session-bound)."""

    DPOP = "dpop"
    MTLS = "mtls"
    BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """A registered MCP client. It authenticates with a `private_key_jwt` assertion (RFC
    7523) signed by `public_jwk` (OKP Ed25519, EC P-256 or RSA) or with a client secret, of
    which only `secret_hash` is stored. `binding` decides what its tokens are bound to.
    `require_dpop_nonce`: its DPoP proofs at the token endpoint must carry a nonce the
    broker issued (RFC 9449 section 8), which bounds how far ahead a stolen DPoP key's
    proofs can be made; only for `binding` `dpop`."""

    client_id: str
    status: ClientStatus = ClientStatus.PENDING
    public_jwk: dict[str, Any] | None = None
    secret_hash: str | None = None
    allowed_audiences: tuple[str, ...] = ()
    allowed_scopes: tuple[str, ...] = ()
    max_sessions: int = 10
    limit_policy: LimitPolicy = LimitPolicy.REJECT
    allowed_cidrs: tuple[str, ...] = ()  # empty: any source address
    binding: Binding = Binding.DPOP
    require_dpop_nonce: bool = False
    # Governance (all optional: a file written before these existed still loads).
    # Accountability: who answers for the client, and who let it in, when, until when and
    # under which rule ("manual" for `tokenbroker clients approve`, "trusted_domain:<pattern>"
    # for a CIMD client approved because its host matched `cimd_trusted_domains`). An
    # approved client without `approved_until` (approved before approvals expired) stays
    # approved with no expiry until it is approved again.
    owner: str | None = None
    approved_by: str | None = None
    approved_at: int | None = None  # Unix seconds, like every time here
    approved_until: int | None = None
    approval_rule: str | None = None
    # Key rotation: when the current credential (key or secret) was registered, and the
    # time after which it is refused. Without `key_created_at` the maximum key age
    # (setting `client_key_max_age_days`) cannot be enforced for that client.
    key_created_at: int | None = None
    key_not_after: int | None = None
    # Attestation: the workload's SPIFFE ID (spiffe://trust-domain/path); with
    # `require_attestation` it gets tokens only with a fresh attestation for that ID.
    spiffe_id: str | None = None
    require_attestation: bool = False
    # A CIMD client (its id an https:// URL): the RFC 7638 thumbprints of the document's
    # keys pinned at approval, the fingerprint of the document version approved, its host.
    pinned_thumbprints: tuple[str, ...] = ()
    document_fingerprint: str | None = None
    document_domain: str | None = None
    # Detection (tokenbroker.detection). `usage_window`: the UTC hours it works in ("08-18",
    # "00-06,22-24"), carried by its tokens as the `usage_window` claim, so a validation
    # outside them is `outside_usage_window` (without one, the broker may learn a window
    # from its history). `detection_actions`: its own action per signal ("new_network=deny"),
    # over the broker-wide `detection_actions` setting; absent signals keep that setting's.
    usage_window: str | None = None
    detection_actions: tuple[str, ...] = ()

    @property
    def session_limit(self) -> SessionLimit:
        return SessionLimit(self.max_sessions, self.limit_policy)

    def approval_expired(self, now: float) -> bool:
        """Approved once, but `approved_until` has passed: the client is pending again
        until `tokenbroker clients approve` renews it. False without `approved_until`."""
        return self.status is ClientStatus.APPROVED and self.approved_until is not None and now >= self.approved_until

    def accountability(self) -> dict[str, Any]:
        """What a grant's audit line says about who let this client in: its owner, the
        approval (who, when, under which rule) and, for a CIMD client, the document's
        domain and fingerprint. Only the fields that are set."""
        fields = {
            "owner": self.owner,
            "approved_by": self.approved_by,
            "approved_at": self.approved_at,
            "approval_rule": self.approval_rule,
            "document_domain": self.document_domain,
            "document_fingerprint": self.document_fingerprint,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def effective_status(self, now: float) -> str:
        """What the client is at `now`: "pending", "approved", "disabled", or "expired"
        (approved, but `approved_until` has passed: refused like a pending client)."""
        return "expired" if self.approval_expired(now) else ClientStatus(self.status).value

    def usage_window_mask(self) -> int | None:
        """The hour mask its tokens carry (bit h: UTC hour h), None without a usage window.
        Raises `ValueError` for a window the registry would not store."""
        return parse_window(self.usage_window) if self.usage_window is not None else None

    def detection_policy(self) -> dict[Signal, Action]:
        """Its own action per signal (only the signals it sets). Raises `ValueError` naming
        a malformed entry, an unknown signal or action, or a signal given twice."""
        return parse_actions(signal_actions(self.detection_actions), f"client {self.client_id!r} detection_actions")

    def key_deadline(self, max_age_seconds: int | None = None) -> int | None:
        """When the client's credential stops being accepted: `key_not_after`, or
        `key_created_at` + `max_age_seconds` when that is earlier. None: never (no
        `key_not_after`, and no maximum age or no `key_created_at` to count it from)."""
        deadlines = [self.key_not_after] if self.key_not_after is not None else []
        if max_age_seconds is not None and self.key_created_at is not None:
            deadlines.append(self.key_created_at + max_age_seconds)
        return min(deadlines) if deadlines else None


def signal_actions(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Texts like "new_network=deny" as signal -> action, not yet checked against the known
    names (`parse_actions` does that); `ValueError` for an entry without "=" or a repeated
    signal, which would leave the client's action ambiguous."""
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError('detection_actions must be a list of texts like "new_network=deny"')
        name, sep, action = entry.partition("=")
        name, action = name.strip(), action.strip()
        if not sep or not name or not action:
            raise ValueError(
                f"detection action {entry[:80]!r} is not SIGNAL=ACTION: write it like new_network=deny "
                f"(signals: {', '.join(s.value for s in Signal)}; actions: {', '.join(a.value for a in Action)})"
            )
        if name in out:
            raise ValueError(f"detection action for {name[:40]!r} is given twice: give each signal once")
        out[name] = action
    return out


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """A registered MCP server (a caller of ValidateToken). It proves itself with an API
    key in metadata (only `api_key_hash` is stored) or with its mTLS client certificate
    (`cert_thumbprint`, base64url SHA-256 of the DER). `admin` callers may also revoke and
    list sessions. `relay_client_ip`: the server may relay its clients' addresses at
    IssueToken (a gateway in front of them), believed only for its own `audiences`.
    `required_scopes`: scopes every request a gateway door (`/authz`, Envoy's `Check`)
    lets through for this server must carry."""

    server_id: str
    audiences: tuple[str, ...] = ()
    api_key_hash: str | None = None
    cert_thumbprint: str | None = None
    admin: bool = False
    relay_client_ip: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    required_scopes: tuple[str, ...] = ()


@runtime_checkable
class Registry(Protocol):
    def client(self, client_id: str) -> ClientRecord | None: ...

    def server_by_api_key(self, api_key: str) -> ServerRecord | None:
        """The server whose key this is (compared in constant time), or None."""
        ...

    def server_by_cert(self, cert_thumbprint: str) -> ServerRecord | None: ...
