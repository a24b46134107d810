"""AuditLog: one JSON line per decision, and never a credential."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
import structlog

from tokenbroker import Broker, Keyring
from tokenbroker.audit import REDACTED, AuditLog
from tokenbroker.logs import configure_logging

AUDIENCE = "https://mcp.test/mcp"


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_event_is_one_json_line_with_the_decision_and_rule() -> None:
    stream = io.StringIO()
    audit = AuditLog(stream, clock=lambda: 1_700_000_000.25)
    audit.record(
        event="issue",
        client_id="agent",
        audience=AUDIENCE,
        decision="grant",
        rule="client.approved",
        source_ip="10.0.0.7",
        session="s1",
        jti="j1",
    )
    assert lines(stream) == [
        {
            "time": "2023-11-14T22:13:20.250Z",
            "event": "issue",
            "client": "agent",
            "audience": AUDIENCE,
            "decision": "grant",
            "rule": "client.approved",
            "source_ip": "10.0.0.7",
            "session": "s1",
            "jti": "j1",
            "seq": 1,
            "prev": "0" * 64,  # the first line of a chain (tokenbroker.audit_chain)
        }
    ]


def test_audit_never_contains_a_token() -> None:
    broker = Broker(Keyring.generate(), issuer="https://broker.test")
    issued = broker.issue(client_id="agent", audience=AUDIENCE)
    token = issued.access_token
    stream = io.StringIO()
    AuditLog(stream).record(
        event="validate",
        client_id="agent",
        audience=AUDIENCE,
        decision="refuse",
        rule="REPLAYED",
        source_ip=None,
        access_token=token,
        token=token,
        dpop_proof="eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiIxIn0.c2ln",
        client_assertion=token,
        client_secret="s3cr3t",
        api_key="k3y",
        detail=f"saw {token} in a header",
        nested={"Authorization": f"DPoP {token}", "ok": 1},
        jti=issued.jti,
    )
    text = stream.getvalue()
    assert token not in text
    assert token.split(".")[2] not in text
    assert "s3cr3t" not in text
    assert "k3y" not in text
    assert "eyJ" not in text
    (entry,) = lines(stream)
    assert entry["access_token"] == REDACTED
    assert entry["client_secret"] == REDACTED
    assert entry["detail"] == f"saw {REDACTED} in a header"
    assert entry["nested"] == {"Authorization": REDACTED, "ok": 1}
    assert entry["jti"] == issued.jti  # an id, not a credential: kept


def test_decision_must_be_grant_or_refuse() -> None:
    with pytest.raises(ValueError, match="grant"):
        AuditLog(io.StringIO()).record(
            event="issue", client_id="a", audience=AUDIENCE, decision="ok", rule="r", source_ip=None
        )


def test_file_sink_appends_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    for decision in ("grant", "refuse"):
        audit = AuditLog(path)
        audit.record(event="issue", client_id="a", audience=AUDIENCE, decision=decision, rule="r", source_ip="::1")
        audit.close()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["decision"] for e in entries] == ["grant", "refuse"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_binary_stream_sink() -> None:
    stream = io.BytesIO()
    AuditLog(stream).record(event="issue", client_id="a", audience=AUDIENCE, decision="grant", rule="r")
    assert json.loads(stream.getvalue())["client"] == "a"


def test_default_sink_is_the_structured_log() -> None:
    stream = io.BytesIO()
    configure_logging("info", json=True, stream=stream)
    try:
        AuditLog().record(
            event="issue", client_id="a", audience=AUDIENCE, decision="refuse", rule="client.pending", token="t0k"
        )
    finally:
        structlog.reset_defaults()
    entry = json.loads(stream.getvalue())
    assert entry["event"] == "issue"
    assert entry["rule"] == "client.pending"
    assert entry["audit"] is True
    assert entry["level"] == "info"
    assert "timestamp" in entry
    assert "t0k" not in stream.getvalue().decode()
