"""`FileRegistry`: the registry of MCP clients and servers kept in one TOML file.

```toml
[clients.agent-7]
status = "approved"
public_jwk = { kty = "OKP", crv = "Ed25519", x = "..." }
allowed_audiences = ["https://mcp.example.com/mcp"]
allowed_scopes = ["tools:call"]
max_sessions = 10
limit_policy = "reject"
allowed_cidrs = []
binding = "dpop"          # dpop (the default when absent), mtls or bearer
require_dpop_nonce = true # optional, default false: DPoP proofs at /token need a broker nonce
# Governance, each optional (times are Unix seconds, UTC):
owner = "team-payments <payments@example.com>"
approved_by = "alice"
approved_at = 1767225600
approved_until = 1774998000   # absent on an approved client: approved with no expiry
approval_rule = "manual"      # or "trusted_domain:<pattern>" (CIMD)
key_created_at = 1767225600   # absent: the maximum key age is not enforced for it
key_not_after = 1798761600
spiffe_id = "spiffe://example.org/agent-7"
require_attestation = true    # needs spiffe_id
pinned_thumbprints = ["..."]  # CIMD clients: RFC 7638 thumbprints pinned at approval
document_fingerprint = "..."  # CIMD clients: the approved document version
document_domain = "agents.example.com"
# Detection, each optional:
usage_window = "08-18"        # UTC hours it works in (end exclusive; "22-06" spans midnight,
                              # ranges joined by commas); its tokens carry it, a use outside
                              # is outside_usage_window. Absent: learned from its history;
                              # "00-24": every hour, nothing learned.
detection_actions = ["new_network=deny", "concurrent_origins=revoke_session"]
                              # its own action per signal (alert, deny, revoke_session) over
                              # the detection_actions setting; signals: new_network,
                              # concurrent_origins, resource_breadth, outside_usage_window,
                              # burst_after_auth

[servers.mcp-1]
audiences = ["https://mcp.example.com/mcp"]
api_key_hash = "..."
admin = false
relay_client_ip = false   # true: believed when it relays a client's address for its audiences
required_scopes = ["tools:call"]  # what the gateway doors require of every request for it
```

Only hashes of client secrets and server API keys are stored, never the values. The file
is re-read when it changes (checked at most once per second), so `tokenbroker clients
approve` takes effect in a running broker without a restart."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from tokenbroker import secret_format
from tokenbroker.detection.detector import parse_actions, parse_window, window_text
from tokenbroker.detection.signals import Signal
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.jwk import thumbprint
from tokenbroker.models import LimitPolicy
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord, signal_actions

log = structlog.get_logger("tokenbroker.registry")

# Client and server ids: URL characters (a client id may be a URL) without braces, which
# delimit the Redis hash tag, and without whitespace or control characters.
_ID = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,256}")
_RELOAD_EVERY_SECONDS = 1.0
_SUPPORTED_KEYS = {("OKP", "Ed25519"): ("x",), ("EC", "P-256"): ("x", "y")}
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "oth")
# The `alg` a registered key may name (RFC 7517 4.4: the algorithm it is meant for); the
# verifier then uses the key with that algorithm only. "Ed25519" is RFC 9864's name.
_ALGS_FOR_KEY_TYPE = {"OKP": ("EdDSA", "Ed25519"), "EC": ("ES256",), "RSA": ("RS256", "PS256")}
# RSA client keys: at least 2048 bits (NIST SP 800-131A); at most 8192, so that nobody
# can register a key that makes each verification cost tens of milliseconds.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
# A public exponent this large is legal but makes verification cost like signing; real
# keys use 65537 (NIST SP 800-56B allows up to 2**256).
_MAX_RSA_EXPONENT_BITS = 256
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# Governance fields. Times are Unix seconds up to the end of year 9999 (a value beyond is
# almost always milliseconds). Texts (owner, approver) are bounded and printable.
_MAX_TIME = 253_402_300_799
_MAX_OWNER_CHARS = 200
_MAX_APPROVER_CHARS = 128
# "manual", "trusted_domain:*.example.com", ...: a rule name, then what it matched.
_APPROVAL_RULE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[\x21-\x7e]{1,253})?")
# SPIFFE ID (SPIFFE standard, section 2): lowercase trust domain, then a path of one or
# more non-empty segments of letters, digits, '.', '-', '_' ('.' and '..' refused below).
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]{1,255})((?:/[A-Za-z0-9._-]+)+)")
_MAX_SPIFFE_ID_BYTES = 2048
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url SHA-256 (RFC 7638)
_MAX_PINNED_THUMBPRINTS = 64
_FINGERPRINT = re.compile(r"[A-Za-z0-9._:+/=-]{1,200}")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Detection fields: 24 one-hour ranges fit in 144 characters; "outside_usage_window=
# revoke_session", the longest entry, in 35.
_MAX_USAGE_WINDOW_CHARS = 200
_MAX_DETECTION_ACTION_CHARS = 64
# The members RFC 7638 hashes for each key type (section 3.2), in lexicographic order.


class RegistryFileError(InvalidArgumentError):
    """The registry file cannot be read or holds an unusable record."""


def generate_secret(kind: secret_format.Kind = "client_secret") -> str:
    """A new client secret (`tbs_...`) or, with kind "server_api_key", server API key
    (`tbk_...`), in the format secret scanners match (`tokenbroker.secret_format`).
    Secrets minted before it (43 characters of base64url) still work: only hashes are stored."""
    return secret_format.mint(kind)


def hash_secret(value: str) -> str:
    """The stored form of a client secret or API key: base64url SHA-256.

    A fast hash is right here (no bcrypt/argon2): every secret and key is generated from
    at least 238 random bits, so there is nothing to brute-force and the hot path stays cheap."""
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def secret_matches(presented: str, stored_hash: str | None) -> bool:
    """True when `presented` hashes to `stored_hash`, compared in constant time."""
    if not stored_hash or not presented:
        return False
    return hmac.compare_digest(hash_secret(presented).encode("ascii"), stored_hash.encode("ascii", "replace"))


def check_id(kind: str, value: str) -> str:
    """Returns `value` when it is usable as a client or server id, else raises."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind} id {value!r} is not valid: use 1 to 256 URL characters (letters, digits, "
            "'.', '-', '_', ':', '/', ...) without spaces or braces"
        )
    return value


def check_public_jwk(jwk: Mapping[str, Any], *, where: str = "public key") -> dict[str, str]:
    """Returns a clean public JWK (OKP Ed25519, EC P-256 or RSA of 2048 to 8192 bits), or
    raises naming what is wrong.

    A private member (`d`, ...) is refused: the registry holds public keys only. An RSA
    key's `n` and `e` are checked as numbers (size, odd exponent of at least 3) and stored
    in their minimal base64url form, so its RFC 7638 thumbprint is the standard one. An
    `alg` must fit the key type and `use`, when present, must be `sig`."""
    if not isinstance(jwk, Mapping):
        raise InvalidArgumentError(f"{where} must be a JWK object")
    if any(member in jwk for member in _PRIVATE_JWK_MEMBERS):
        raise InvalidArgumentError(f"{where} holds a private key: register the public key only")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    clean: dict[str, str]
    if kty == "RSA":
        clean = {"kty": "RSA", **_check_rsa_members(jwk, where)}
    else:
        members = _SUPPORTED_KEYS.get((kty, crv))  # type: ignore[arg-type]
        if members is None:
            raise InvalidArgumentError(
                f"{where} is {str(kty)[:20]}/{str(crv)[:20]}: only OKP Ed25519, EC P-256 and RSA keys are supported"
            )
        clean = {"kty": str(kty), "crv": str(crv)}
        for member in members:
            value = jwk.get(member)
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{where} lacks its {member!r} member")
            clean[member] = value
    for optional in ("kid", "alg", "use"):
        if isinstance(jwk.get(optional), str):
            clean[optional] = jwk[optional]
    allowed_algs = _ALGS_FOR_KEY_TYPE[clean["kty"]]
    if "alg" in clean and clean["alg"] not in allowed_algs:
        raise InvalidArgumentError(
            f"{where} names alg {clean['alg'][:20]!r}, which a {clean['kty']} key cannot sign with: use "
            f"{' or '.join(allowed_algs)}, or leave alg out"
        )
    if "use" in clean and clean["use"] != "sig":
        raise InvalidArgumentError(
            f"{where} has use {clean['use'][:20]!r}: a client key signs assertions, so use must be 'sig' (or absent)"
        )
    return clean


def _base64url_uint(jwk: Mapping[str, Any], member: str, where: str) -> int:
    """The unsigned integer in a JWK member (RFC 7518 6.3.1: base64url, big-endian)."""
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{where} lacks its {member!r} member")
    if not _BASE64URL.fullmatch(value):
        raise InvalidArgumentError(f"{where}: {member!r} is not base64url (A-Z, a-z, 0-9, '-', '_', no padding)")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise InvalidArgumentError(f"{where}: {member!r} is not valid base64url") from None
    return int.from_bytes(raw, "big")


def _base64url_of_uint(number: int) -> str:
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _check_rsa_members(jwk: Mapping[str, Any], where: str) -> dict[str, str]:
    """`n` and `e` of an RSA public JWK, checked and in minimal form, or raises."""
    n = _base64url_uint(jwk, "n", where)
    e = _base64url_uint(jwk, "e", where)
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise InvalidArgumentError(
            f"{where} is an RSA key of {bits} bits: RSA client keys need at least {MIN_RSA_BITS} bits "
            "(generate one with `tokenbroker clients add ID --generate-key FILE --key-type rsa`)"
        )
    if bits > MAX_RSA_BITS:
        raise InvalidArgumentError(
            f"{where} is an RSA key of {bits} bits: at most {MAX_RSA_BITS} bits are accepted (use 2048 to 4096)"
        )
    if n % 2 == 0:
        raise InvalidArgumentError(f"{where}: its modulus 'n' is even, so it is not an RSA public key")
    if e < 3 or e % 2 == 0:
        raise InvalidArgumentError(
            f"{where}: its public exponent 'e' must be an odd number of at least 3 (65537, 'AQAB', is the usual one)"
        )
    if e.bit_length() > _MAX_RSA_EXPONENT_BITS or e >= n:
        raise InvalidArgumentError(
            f"{where}: its public exponent 'e' is too large (at most {_MAX_RSA_EXPONENT_BITS} bits; "
            "65537, 'AQAB', is the usual one)"
        )
    return {"n": _base64url_of_uint(n), "e": _base64url_of_uint(e)}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint (base64url) of a public JWK the registry accepts
    (OKP Ed25519, EC P-256, RSA), what `clients show` prints and CIMD approval pins."""
    return thumbprint(check_public_jwk(jwk))


def check_time(name: str, value: Any) -> int:
    """`value` as a time in Unix seconds, or raises saying how to write one."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_TIME:
        raise InvalidArgumentError(
            f"{name} must be a time in whole seconds since 1970-01-01 UTC, at most {_MAX_TIME} (the end of year "
            f"9999), not {str(value)[:40]!r} (milliseconds are not accepted)"
        )
    return value


def check_text(name: str, value: Any, max_chars: int) -> str:
    """`value` when it is a printable one-line text of 1 to `max_chars` characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
        raise InvalidArgumentError(f"{name} must be a text of 1 to {max_chars} characters")
    if not value.isprintable():
        raise InvalidArgumentError(f"{name} must be printable on one line (no control characters or line breaks)")
    return value


def check_spiffe_id(value: Any) -> str:
    """`value` when it is a SPIFFE ID of a workload, `spiffe://trust-domain/path`."""
    how = "write it as spiffe://trust-domain/path (a lowercase trust domain, then a path such as /ns/prod/agent)"
    if not isinstance(value, str):
        raise InvalidArgumentError(f"spiffe_id must be a string: {how}")
    match = _SPIFFE_ID.fullmatch(value)
    if match is None or len(value.encode("utf-8")) > _MAX_SPIFFE_ID_BYTES:
        raise InvalidArgumentError(f"spiffe_id {value[:80]!r} is not a SPIFFE ID: {how}")
    if any(segment in (".", "..") for segment in match.group(2).split("/")):
        raise InvalidArgumentError(f"spiffe_id {value[:80]!r} has a '.' or '..' path segment: {how}")
    return value


def check_approval_rule(value: Any) -> str:
    """`value` when it names an approval rule: "manual" or "<rule>:<what it matched>"."""
    if not isinstance(value, str) or not _APPROVAL_RULE.fullmatch(value):
        raise InvalidArgumentError(
            f'approval_rule {str(value)[:80]!r} is not a rule name: use "manual" or "trusted_domain:<pattern>"'
        )
    return value


def check_host(name: str, value: Any) -> str:
    """`value` in lowercase when it is a DNS name or an IP address, with an optional port."""
    if not isinstance(value, str) or not 1 <= len(value) <= 300:
        raise InvalidArgumentError(f"{name} must be a host name such as agents.example.com")
    text = value.lower()
    bad = InvalidArgumentError(f"{name} {value[:80]!r} is not a host name such as agents.example.com (or host:port)")
    if text.startswith("["):  # an IPv6 address, bracketed as in a URL
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise bad
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, colon, after = text.partition(":")
        port = after if colon else None
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise bad
    if port is not None and not (port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise bad
    return text


def check_binding(value: Any) -> Binding:
    """`value` as a `Binding`, or raises naming the accepted ones."""
    try:
        return Binding(value)
    except ValueError:
        choices = ", ".join(b.value for b in Binding)
        raise InvalidArgumentError(f"binding {str(value)[:40]!r} is not one of {choices}") from None


def check_usage_window(value: Any, what: str = "usage_window") -> str:
    """`value` in its one spelling (`window_text` of its hour mask: "08-18", "22-06" as
    "00-06,22-24"), so the file and `clients show` say the same for the same hours; or
    raises saying how to write one."""
    how = 'UTC hour ranges like "08-18", "22-06" (over midnight) or "08-12,13-18"'
    if not isinstance(value, str) or not value.isascii() or len(value) > _MAX_USAGE_WINDOW_CHARS:
        raise InvalidArgumentError(f"{what} must be {how}, at most {_MAX_USAGE_WINDOW_CHARS} characters")
    try:
        return window_text(parse_window(value))
    except ValueError:
        raise InvalidArgumentError(
            f"{what} {value!r} is not {how}: a range starts at 00-23 and ends at another hour, 01-24"
        ) from None


def check_detection_actions(value: Any, what: str = "detection_actions") -> tuple[str, ...]:
    """`value` ("signal=action" texts) as one entry per signal, in the signals' order, or
    raises naming the bad entry and the accepted signals and actions."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgumentError(f'{what} must be a list of texts like "new_network=deny"')
    if len(value) > len(Signal) or any(len(v) > _MAX_DETECTION_ACTION_CHARS for v in value):
        raise InvalidArgumentError(
            f"{what} holds at most one entry per signal ({len(Signal)}), each at most "
            f"{_MAX_DETECTION_ACTION_CHARS} characters"
        )
    try:
        policy = parse_actions(signal_actions(tuple(value)), what)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc) if str(exc).startswith(what) else f"{what}: {exc}") from None
    return tuple(f"{signal.value}={policy[signal].value}" for signal in Signal if signal in policy)


def check_cidr(value: str) -> str:
    """Returns the network in canonical form ("10.0.0.0/8"), or raises."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise InvalidArgumentError(f"{value!r} is not an IP network: write it like 10.0.0.0/8 or fd00::/8") from None


def _strings(value: Any, field: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise RegistryFileError(f"{where}: {field} must be a list of strings")
    return tuple(value)


def _client_from_toml(client_id: str, data: Mapping[str, Any], source: str) -> ClientRecord:
    where = f"{source}: [clients.{client_id}]"
    try:
        check_id("client", client_id)
        unknown = set(data) - set(ClientRecord.__dataclass_fields__) - {"client_id"}
        if unknown:
            raise RegistryFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        jwk = data.get("public_jwk")
        max_sessions = data.get("max_sessions", 10)
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1:
            raise RegistryFileError(f"{where}: max_sessions must be a positive integer")
        secret_hash = data.get("secret_hash")
        if secret_hash is not None and not isinstance(secret_hash, str):
            raise RegistryFileError(f"{where}: secret_hash must be a string")
        require_dpop_nonce = data.get("require_dpop_nonce", False)
        if not isinstance(require_dpop_nonce, bool):
            raise RegistryFileError(f"{where}: require_dpop_nonce must be true or false")
        return _checked_client(
            ClientRecord(
                client_id=client_id,
                status=ClientStatus(data.get("status", ClientStatus.PENDING)),
                public_jwk=check_public_jwk(jwk, where=f"{where} public_jwk") if jwk is not None else None,
                secret_hash=secret_hash,
                allowed_audiences=_strings(data.get("allowed_audiences"), "allowed_audiences", where),
                allowed_scopes=_strings(data.get("allowed_scopes"), "allowed_scopes", where),
                max_sessions=max_sessions,
                limit_policy=LimitPolicy(data.get("limit_policy", LimitPolicy.REJECT)),
                allowed_cidrs=tuple(check_cidr(c) for c in _strings(data.get("allowed_cidrs"), "allowed_cidrs", where)),
                binding=check_binding(data.get("binding", Binding.DPOP)),
                require_dpop_nonce=require_dpop_nonce,
                # Checked by _checked_client, which also checks records made in code.
                **{name: data[name] for name in _GOVERNANCE_FIELDS if name in data},
                usage_window=data.get("usage_window"),
                detection_actions=data.get("detection_actions", ()),
            )
        )
    except RegistryFileError:
        raise
    except (InvalidArgumentError, ValueError) as exc:
        raise RegistryFileError(f"{where}: {exc}") from None


def _server_from_toml(server_id: str, data: Mapping[str, Any], source: str) -> ServerRecord:
    where = f"{source}: [servers.{server_id}]"
    try:
        check_id("server", server_id)
        unknown = set(data) - set(ServerRecord.__dataclass_fields__) - {"server_id"}
        if unknown:
            raise RegistryFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        labels = data.get("labels", {})
        if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
            raise RegistryFileError(f"{where}: labels must be a table of strings")
        for name in ("api_key_hash", "cert_thumbprint"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise RegistryFileError(f"{where}: {name} must be a string")
        for flag in ("admin", "relay_client_ip"):
            if not isinstance(data.get(flag, False), bool):
                raise RegistryFileError(f"{where}: {flag} must be true or false")
        return ServerRecord(
            server_id=server_id,
            audiences=_strings(data.get("audiences"), "audiences", where),
            api_key_hash=data.get("api_key_hash"),
            cert_thumbprint=data.get("cert_thumbprint"),
            admin=data.get("admin", False),
            relay_client_ip=data.get("relay_client_ip", False),
            labels=dict(labels),
            required_scopes=_strings(data.get("required_scopes"), "required_scopes", where),
        )
    except RegistryFileError:
        raise
    except (InvalidArgumentError, ValueError) as exc:
        raise RegistryFileError(f"{where}: {exc}") from None


def _client_to_toml(record: ClientRecord) -> dict[str, Any]:
    data: dict[str, Any] = {"status": str(record.status)}
    if record.secret_hash:
        data["secret_hash"] = record.secret_hash
    data["allowed_audiences"] = list(record.allowed_audiences)
    data["allowed_scopes"] = list(record.allowed_scopes)
    data["max_sessions"] = record.max_sessions
    data["limit_policy"] = str(record.limit_policy)
    data["allowed_cidrs"] = list(record.allowed_cidrs)
    data["binding"] = str(record.binding)
    if record.require_dpop_nonce:
        data["require_dpop_nonce"] = True
    for name in _GOVERNANCE_FIELDS:  # written only when set: old files stay as they were
        value = getattr(record, name)
        if value not in (None, False, ()):
            data[name] = list(value) if isinstance(value, tuple) else value
    if record.usage_window is not None:
        data["usage_window"] = record.usage_window
    if record.detection_actions:
        data["detection_actions"] = list(record.detection_actions)
    if record.public_jwk is not None:
        data["public_jwk"] = dict(record.public_jwk)
    return data


def client_to_dict(record: ClientRecord) -> dict[str, Any]:
    """The record in the shape the file writes (plain JSON types too): the shared registry
    (`registry_shared`) keeps clients in Redis in this same shape."""
    return _client_to_toml(record)


def client_from_dict(client_id: str, data: Mapping[str, Any], source: str) -> ClientRecord:
    """A record from `client_to_dict`'s shape, checked as a file's record is; raises
    `RegistryFileError` naming `source` and the client."""
    return _client_from_toml(client_id, data, source)


def checked_client(record: ClientRecord) -> ClientRecord:
    """The record as the file would store it (clean key, canonical CIDRs, checked
    governance fields), or raises `InvalidArgumentError` naming what is wrong."""
    return _checked_client(record)


def _server_to_toml(record: ServerRecord) -> dict[str, Any]:
    data: dict[str, Any] = {"audiences": list(record.audiences), "admin": record.admin}
    if record.relay_client_ip:
        data["relay_client_ip"] = True
    if record.required_scopes:
        data["required_scopes"] = list(record.required_scopes)
    if record.api_key_hash:
        data["api_key_hash"] = record.api_key_hash
    if record.cert_thumbprint:
        data["cert_thumbprint"] = record.cert_thumbprint
    if record.labels:
        data["labels"] = dict(record.labels)
    return data


def _toml_string(value: str) -> str:
    """`value` as a TOML string or key, escaped by tomli_w."""
    return tomli_w.dumps({"k": value})[len("k = ") : -1]


def _toml_key(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_-]+", value) else _toml_string(value)


def _render_table(header: str, data: Mapping[str, Any]) -> str:
    """One `[header]` table; nested tables (public_jwk, labels) are written inline."""
    flat = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    lines = [f"[{header}]", tomli_w.dumps(flat).rstrip("\n")] if flat else [f"[{header}]"]
    for key, value in data.items():
        if isinstance(value, Mapping):
            members = ", ".join(f"{_toml_key(k)} = {_toml_string(str(v))}" for k, v in value.items())
            lines.append(f"{_toml_key(key)} = {{ {members} }}" if members else f"{_toml_key(key)} = {{}}")
    return "\n".join(lines) + "\n"


def render_registry(clients: Mapping[str, ClientRecord], servers: Mapping[str, ServerRecord]) -> str:
    """The TOML text of a registry (what `FileRegistry.save` writes)."""
    parts = [
        "# tokenbroker registry: MCP clients (who may get tokens) and MCP servers (who may\n"
        "# validate them). Edit with `tokenbroker clients ...` / `tokenbroker servers ...`.\n"
        "# Only hashes of secrets and API keys are stored here.\n"
    ]
    parts += [_render_table(f"clients.{_toml_key(cid)}", _client_to_toml(r)) for cid, r in sorted(clients.items())]
    parts += [_render_table(f"servers.{_toml_key(sid)}", _server_to_toml(r)) for sid, r in sorted(servers.items())]
    return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    clients: dict[str, ClientRecord]
    servers: dict[str, ServerRecord]
    stamp: tuple[int, int, int] | None  # (mtime_ns, size, inode) of what was read; None: no file


class FileRegistry:
    """The `Registry` backed by a TOML file. Thread-safe. A missing file is an empty
    registry; a file that becomes unreadable while running keeps the last good records
    (and logs an error) rather than locking every client out."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot = self._read()
        self._checked_at = self._clock()

    # -- reading --------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> _Snapshot:
        stamp = self._stamp()
        if stamp is None:
            return _Snapshot({}, {}, None)
        try:
            data = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RegistryFileError(f"registry file {self.path} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryFileError(f"registry file {self.path} cannot be read: {exc}") from None
        unknown = set(data) - {"clients", "servers"}
        if unknown:
            raise RegistryFileError(
                f"registry file {self.path}: unknown section(s) {', '.join(sorted(unknown))} "
                "(expected [clients.<id>] and [servers.<id>])"
            )
        source = str(self.path)
        clients, servers = data.get("clients", {}), data.get("servers", {})
        if not isinstance(clients, dict) or not isinstance(servers, dict):
            raise RegistryFileError(f"registry file {self.path}: clients and servers must be tables")
        for kind, table in (("clients", clients), ("servers", servers)):
            for key, value in table.items():
                if not isinstance(value, dict):
                    raise RegistryFileError(f"registry file {self.path}: [{kind}.{key}] must be a table")
        return _Snapshot(
            {cid: _client_from_toml(cid, rec, source) for cid, rec in clients.items()},
            {sid: _server_from_toml(sid, rec, source) for sid, rec in servers.items()},
            stamp,
        )

    def _current(self) -> _Snapshot:
        """The records, re-read when the file changed (a stat at most once per second)."""
        now = self._clock()
        if now - self._checked_at < _RELOAD_EVERY_SECONDS:
            return self._snapshot
        with self._lock:
            if now - self._checked_at < _RELOAD_EVERY_SECONDS:
                return self._snapshot
            self._checked_at = now
            if self._stamp() != self._snapshot.stamp:
                self._reload_locked()
            return self._snapshot

    def _reload_locked(self) -> None:
        try:
            snapshot = self._read()
        except RegistryFileError as exc:
            log.error("registry reload failed; keeping the last good records", error=str(exc))
            return
        if snapshot.stamp is None and self._snapshot.stamp is not None:
            log.warning("registry file disappeared; no client or server is registered now", path=str(self.path))
        self._snapshot = snapshot
        log.info("registry reloaded", path=str(self.path), clients=len(snapshot.clients), servers=len(snapshot.servers))

    def reload(self) -> None:
        """Re-reads the file now. Raises `RegistryFileError` when it is unusable."""
        with self._lock:
            self._snapshot = self._read()
            self._checked_at = self._clock()

    # -- the Registry protocol --------------------------------------------------------

    def client(self, client_id: str) -> ClientRecord | None:
        return self._current().clients.get(client_id)

    def server_by_api_key(self, api_key: str) -> ServerRecord | None:
        """The server whose key this is. Every server's hash is compared, in constant time."""
        if not api_key:
            return None
        presented = hash_secret(api_key).encode("ascii")
        found = None
        for record in self._current().servers.values():
            if record.api_key_hash and hmac.compare_digest(presented, record.api_key_hash.encode("ascii", "replace")):
                found = record
        return found

    def cached_server_by_api_key(self, api_key: str) -> ServerRecord | None:
        """As `server_by_api_key`, from the records loaded last: no stat, no read, no lock
        (for gRPC's polling thread, which must not wait for I/O)."""
        if not api_key:
            return None
        presented = hash_secret(api_key).encode("ascii")
        found = None
        for record in self._snapshot.servers.values():
            if record.api_key_hash and hmac.compare_digest(presented, record.api_key_hash.encode("ascii", "replace")):
                found = record
        return found

    def server_by_cert(self, cert_thumbprint: str) -> ServerRecord | None:
        if not cert_thumbprint:
            return None
        presented = cert_thumbprint.encode("ascii", "replace")
        found = None
        for record in self._current().servers.values():
            if record.cert_thumbprint and hmac.compare_digest(
                presented, record.cert_thumbprint.encode("ascii", "replace")
            ):
                found = record
        return found

    # -- listing ----------------------------------------------------------------------

    def clients(self) -> list[ClientRecord]:
        return [r for _, r in sorted(self._current().clients.items())]

    def servers(self) -> list[ServerRecord]:
        return [r for _, r in sorted(self._current().servers.items())]

    def server(self, server_id: str) -> ServerRecord | None:
        return self._current().servers.get(server_id)

    # -- changes (each re-reads the file, applies one change, saves atomically) --------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Held around each change's read-modify-write: this process's lock, and an
        exclusive flock on a sidecar file for every process (the CLI, and `serve`, which
        records CIMD clients), so one writer never replaces the file with a copy that lacks
        another's change (a `clients disable` lost that way would let the client back in)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # and with it the flock

    def add_client(self, record: ClientRecord) -> None:
        """Registers a new client. Raises `InvalidArgumentError` if the id is taken."""
        check_id("client", record.client_id)
        with self._changing():
            snapshot = self._read()
            if record.client_id in snapshot.clients:
                raise InvalidArgumentError(
                    f"client {record.client_id!r} already exists: change it with `tokenbroker clients update "
                    f"{record.client_id}` or remove it with `tokenbroker clients remove {record.client_id}`"
                )
            self._save_locked({**snapshot.clients, record.client_id: _checked_client(record)}, snapshot.servers)

    def put_client(self, record: ClientRecord) -> None:
        """Adds or replaces a client."""
        check_id("client", record.client_id)
        with self._changing():
            snapshot = self._read()
            self._save_locked({**snapshot.clients, record.client_id: _checked_client(record)}, snapshot.servers)

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Changes fields of a client (e.g. `status=ClientStatus.APPROVED`); returns the new record."""
        with self._changing():
            snapshot = self._read()
            current = snapshot.clients.get(client_id)
            if current is None:
                raise InvalidArgumentError(_unknown_client(client_id))
            try:
                updated = _checked_client(replace(current, **changes))
            except TypeError as exc:
                raise InvalidArgumentError(f"cannot update client {client_id!r}: {exc}") from None
            self._save_locked({**snapshot.clients, client_id: updated}, snapshot.servers)
            return updated

    def remove_client(self, client_id: str) -> None:
        with self._changing():
            snapshot = self._read()
            if client_id not in snapshot.clients:
                raise InvalidArgumentError(_unknown_client(client_id))
            clients = {k: v for k, v in snapshot.clients.items() if k != client_id}
            self._save_locked(clients, snapshot.servers)

    def add_server(self, record: ServerRecord) -> None:
        """Registers a new server. Raises `InvalidArgumentError` if the id is taken."""
        check_id("server", record.server_id)
        with self._changing():
            snapshot = self._read()
            if record.server_id in snapshot.servers:
                raise InvalidArgumentError(
                    f"server {record.server_id!r} already exists: remove it first with "
                    f"`tokenbroker servers remove {record.server_id}`"
                )
            self._save_locked(snapshot.clients, {**snapshot.servers, record.server_id: record})

    def put_server(self, record: ServerRecord) -> None:
        """Adds or replaces a server."""
        check_id("server", record.server_id)
        with self._changing():
            snapshot = self._read()
            self._save_locked(snapshot.clients, {**snapshot.servers, record.server_id: record})

    def remove_server(self, server_id: str) -> None:
        with self._changing():
            snapshot = self._read()
            if server_id not in snapshot.servers:
                raise InvalidArgumentError(
                    f"server {server_id!r} is not registered: `tokenbroker servers list` shows the registered ones"
                )
            servers = {k: v for k, v in snapshot.servers.items() if k != server_id}
            self._save_locked(snapshot.clients, servers)

    def _save_locked(self, clients: dict[str, ClientRecord], servers: dict[str, ServerRecord]) -> None:
        text = render_registry(clients, servers)
        tomllib.loads(text)  # never write a file we could not read back
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a leftover temp file
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._snapshot = _Snapshot(dict(clients), dict(servers), self._stamp())
        self._checked_at = self._clock()

    def __repr__(self) -> str:
        return f"FileRegistry({str(self.path)!r})"


_GOVERNANCE_FIELDS = (
    "owner",
    "approved_by",
    "approved_at",
    "approved_until",
    "approval_rule",
    "key_created_at",
    "key_not_after",
    "spiffe_id",
    "require_attestation",
    "pinned_thumbprints",
    "document_fingerprint",
    "document_domain",
)


def _checked_governance(record: ClientRecord) -> dict[str, Any]:
    """The record's governance fields, checked (types, bounds, order of times), or raises."""
    cid = record.client_id

    def optional(name: str, check: Callable[[Any], Any]) -> Any:
        value = getattr(record, name)
        return None if value is None else check(value)

    fields: dict[str, Any] = {
        "owner": optional("owner", lambda v: check_text("owner", v, _MAX_OWNER_CHARS)),
        "approved_by": optional("approved_by", lambda v: check_text("approved_by", v, _MAX_APPROVER_CHARS)),
        "approval_rule": optional("approval_rule", check_approval_rule),
        "spiffe_id": optional("spiffe_id", check_spiffe_id),
        "document_domain": optional("document_domain", lambda v: check_host("document_domain", v)),
    }
    for name in ("approved_at", "approved_until", "key_created_at", "key_not_after"):
        value = getattr(record, name)
        fields[name] = None if value is None else check_time(name, value)
    fingerprint = record.document_fingerprint
    if fingerprint is not None and (not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint)):
        raise InvalidArgumentError("document_fingerprint must be 1 to 200 characters of A-Z a-z 0-9 . _ : + / = -")
    fields["document_fingerprint"] = fingerprint
    pinned = record.pinned_thumbprints
    if not isinstance(pinned, list | tuple) or not all(isinstance(t, str) and _THUMBPRINT.fullmatch(t) for t in pinned):
        raise InvalidArgumentError("pinned_thumbprints must be a list of RFC 7638 SHA-256 thumbprints (43 base64url)")
    fields["pinned_thumbprints"] = tuple(dict.fromkeys(pinned))
    if len(fields["pinned_thumbprints"]) > _MAX_PINNED_THUMBPRINTS:
        raise InvalidArgumentError(f"pinned_thumbprints holds more than {_MAX_PINNED_THUMBPRINTS} keys")
    if not isinstance(record.require_attestation, bool):
        raise InvalidArgumentError("require_attestation must be true or false")
    fields["require_attestation"] = record.require_attestation
    if record.require_attestation and fields["spiffe_id"] is None:
        raise InvalidArgumentError(
            f"client {cid!r} requires attestation but has no spiffe_id, so no attestation could match it: give "
            "--spiffe-id spiffe://trust-domain/path, or turn it off (--no-require-attestation)"
        )
    at, until = fields["approved_at"], fields["approved_until"]
    if at is not None and until is not None and until <= at:
        raise InvalidArgumentError(f"client {cid!r}: approved_until must be later than approved_at")
    created, not_after = fields["key_created_at"], fields["key_not_after"]
    if created is not None and not_after is not None and not_after <= created:
        raise InvalidArgumentError(f"client {cid!r}: key_not_after must be later than key_created_at")
    return fields


def _checked_client(record: ClientRecord) -> ClientRecord:
    """The record with a clean public JWK, canonical CIDRs and checked governance fields,
    or raises."""
    if record.max_sessions < 1:
        raise InvalidArgumentError("max_sessions must be at least 1")
    binding = check_binding(record.binding)
    if not isinstance(record.require_dpop_nonce, bool):
        raise InvalidArgumentError("require_dpop_nonce must be true or false")
    if record.require_dpop_nonce and binding is not Binding.DPOP:
        raise InvalidArgumentError(
            f"client {record.client_id!r} has binding {binding.value}, which sends no DPoP proof, so it cannot "
            "require a DPoP nonce: use binding dpop, or turn require_dpop_nonce off (--no-require-dpop-nonce)"
        )
    return replace(
        record,
        status=ClientStatus(record.status),
        limit_policy=LimitPolicy(record.limit_policy),
        binding=binding,
        public_jwk=check_public_jwk(record.public_jwk) if record.public_jwk is not None else None,
        allowed_cidrs=tuple(check_cidr(c) for c in record.allowed_cidrs),
        allowed_audiences=tuple(record.allowed_audiences),
        allowed_scopes=tuple(record.allowed_scopes),
        **_checked_governance(record),
        usage_window=check_usage_window(record.usage_window) if record.usage_window is not None else None,
        detection_actions=check_detection_actions(record.detection_actions),
    )


def _unknown_client(client_id: str) -> str:
    return f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones"


__all__ = [
    "FileRegistry",
    "RegistryFileError",
    "check_approval_rule",
    "check_binding",
    "check_cidr",
    "check_detection_actions",
    "check_host",
    "check_id",
    "check_public_jwk",
    "check_spiffe_id",
    "check_text",
    "check_time",
    "check_usage_window",
    "checked_client",
    "client_from_dict",
    "client_to_dict",
    "generate_secret",
    "hash_secret",
    "jwk_thumbprint",
    "render_registry",
    "secret_matches",
]
