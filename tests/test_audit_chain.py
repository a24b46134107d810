"""The hash-chained audit file: `AuditLog` writes the chain (continuing an existing file,
with several writers on one file), `tokenbroker audit verify` finds the first edited,
removed, reordered or foreign line, and `tokenbroker audit why` says what let a session
or token in. Real files, the real CLI (click's CliRunner), real processes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbroker.audit import REDACTED, AuditLog
from tokenbroker.audit_chain import GENESIS, MAX_LINE_BYTES, BrokenChain, verify
from tokenbroker.cli import main
from tokenbroker.client import BrokerClient

from support.oauth import AUDIENCE_A, OAuthDeployment, http_client, secret_token

AUDIENCE = "https://mcp.test/mcp"
SECRET = "bearer-secret-" + "s" * 30
ADMIN_KEY = "admin-key-" + "a" * 40


def write(path: Path, count: int, *, start: int = 1) -> None:
    """`count` grant lines for clients agent-`start`... through one AuditLog."""
    audit = AuditLog(path)
    try:
        for i in range(start, start + count):
            grant(audit, f"agent-{i}", session=f"s-{i}", jti=f"j-{i}")
    finally:
        audit.close()


def grant(audit: AuditLog, client: str, *, session: str, jti: str, **fields: Any) -> None:
    audit.record(
        event="issue",
        client_id=client,
        audience=AUDIENCE,
        decision="grant",
        rule="client.approved",
        source_ip="127.0.0.1",
        auth_method="client_secret",
        session=session,
        jti=jti,
        binding="dpop",
        scope="tools:call",
        **fields,
    )


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def put_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_bad_line(result: Result, line: int, *fragments: str) -> None:
    """`audit verify` failed with one line on stderr naming `line`."""
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert "Traceback" not in result.output
    assert message.count("\n") == 0, message
    assert f": line {line}: " in message, message
    for fragment in fragments:
        assert fragment in message, message


# -- the chain AuditLog writes -----------------------------------------------------------------


def test_each_line_names_the_hash_of_the_line_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 4)
    lines = raw_lines(path)
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    for before, entry in zip(lines, entries[1:], strict=False):
        assert entry["prev"] == hashlib.sha256(before).hexdigest()
    result = cli("audit", "verify", str(path))
    assert result.exit_code == 0, result.output
    last = hashlib.sha256(lines[-1]).hexdigest()
    assert result.stdout.strip() == f"{path}: 4 lines, chain intact, last hash {last}"


def test_a_reopened_file_continues_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 3)
    write(path, 2, start=4)
    assert [json.loads(line)["seq"] for line in raw_lines(path)] == [1, 2, 3, 4, 5]
    assert verify(path).lines == 5


def test_a_file_truncated_under_the_writer_starts_a_new_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    grant(audit, "a", session="s1", jti="j1")
    path.write_bytes(b"")  # logrotate's copytruncate
    grant(audit, "a", session="s2", jti="j2")
    audit.close()
    (entry,) = [json.loads(line) for line in raw_lines(path)]
    assert (entry["seq"], entry["prev"], entry["session"]) == (1, GENESIS, "s2")
    assert verify(path).lines == 1


def test_a_torn_last_line_is_ended_and_reported(tmp_path: Path) -> None:
    """A write cut short (the broker killed mid-line) leaves a line without its newline:
    the next writer ends it before its own line, and verify names it."""
    path = tmp_path / "audit.jsonl"
    write(path, 3)
    path.write_bytes(path.read_bytes()[:-20])
    write(path, 1, start=4)
    lines = raw_lines(path)
    assert len(lines) == 4
    assert json.loads(lines[3])["prev"] == hashlib.sha256(lines[2]).hexdigest()
    assert_bad_line(cli("audit", "verify", str(path)), 3, "not JSON")


def test_a_caller_cannot_set_the_chain_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    grant(audit, "a", session="s1", jti="j1", seq=99, prev="f" * 64)
    audit.close()
    entry = json.loads(raw_lines(path)[0])
    assert (entry["seq"], entry["prev"]) == (1, GENESIS)


def test_a_line_too_long_to_verify_is_refused_and_not_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    with pytest.raises(ValueError, match="longer than"):
        grant(audit, "a", session="s1", jti="j1", detail="x" * MAX_LINE_BYTES)
    grant(audit, "a", session="s2", jti="j2")
    audit.close()
    assert [json.loads(line)["session"] for line in raw_lines(path)] == ["s2"]
    assert verify(path).lines == 1


def test_a_stream_is_chained_and_the_suppressed_summary_too(tmp_path: Path) -> None:
    stream = io.StringIO()
    audit = AuditLog(stream, refusal_burst=1, refusal_rate=0)
    for _ in range(3):  # one written, two suppressed
        audit.record(
            event="issue",
            client_id="x",
            audience=AUDIENCE,
            decision="refuse",
            rule="client.unknown",
            authenticated=False,
        )
    grant(audit, "a", session="s1", jti="j1")  # preceded by the summary line
    path = tmp_path / "stream.jsonl"
    path.write_text(stream.getvalue())
    entries = [json.loads(line) for line in raw_lines(path)]
    assert [(e["seq"], e["event"]) for e in entries] == [(1, "issue"), (2, "audit_suppressed"), (3, "issue")]
    assert entries[1]["suppressed"] == 2
    assert verify(path).lines == 3


def test_two_writers_in_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path), AuditLog(path)]

    def work(n: int) -> None:
        for i in range(150):
            grant(logs[n % 2], f"agent-{n}", session=f"s-{n}-{i}", jti=f"j-{n}-{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    assert verify(path).lines == 900


WRITER = """
import sys
from tokenbroker.audit import AuditLog
audit = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    audit.record(event="issue", client_id=sys.argv[2], audience="a", decision="grant", rule="r",
                 session=f"{sys.argv[2]}-{i}", jti=f"j-{sys.argv[2]}-{i}")
audit.close()
"""


def test_two_processes_appending_to_one_file_keep_one_chain(tmp_path: Path) -> None:
    """As the workers of `serve --workers N` share one audit file."""
    path = tmp_path / "audit.jsonl"
    write(path, 2)  # an existing file: both continue it
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"worker-{n}", "400"], stderr=subprocess.PIPE)
        for n in range(3)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err.decode()
    verified = verify(path)
    assert verified.lines == 1202
    clients = [json.loads(line)["client"] for line in raw_lines(path)]
    assert len({c for c in clients if c.startswith("worker-")}) == 3


# -- audit verify: what it finds ------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write(path, 6)
    return path


@pytest.mark.parametrize("k", [1, 3, 5])
def test_an_edited_character_names_its_line(chain: Path, k: int) -> None:
    lines = raw_lines(chain)
    edited = lines[k - 1].replace(f'"agent-{k}"'.encode(), b'"agent-X"')  # one character
    assert edited != lines[k - 1]
    lines[k - 1] = edited
    put_lines(chain, lines)
    assert_bad_line(cli("audit", "verify", str(chain)), k, "edited")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_removed_line_is_named(chain: Path, k: int) -> None:
    lines = raw_lines(chain)
    del lines[k - 1]
    put_lines(chain, lines)
    assert_bad_line(cli("audit", "verify", str(chain)), k, "removed")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_swapped_lines_are_named(chain: Path, k: int) -> None:
    lines = raw_lines(chain)
    lines[k - 1], lines[k] = lines[k], lines[k - 1]
    put_lines(chain, lines)
    assert_bad_line(cli("audit", "verify", str(chain)), k)


def test_appended_garbage_and_foreign_lines_are_named(chain: Path) -> None:
    original = chain.read_bytes()
    chain.write_bytes(original + b"garbage\n")
    assert_bad_line(cli("audit", "verify", str(chain)), 7, "not JSON")
    chain.write_bytes(original + b'{"event":"issue","decision":"grant"}\n')  # a hand-written grant
    assert_bad_line(cli("audit", "verify", str(chain)), 7, "no seq")
    chain.write_bytes(original + b"\n")
    assert_bad_line(cli("audit", "verify", str(chain)), 7, "empty line")
    chain.write_bytes(original[:-1])
    assert_bad_line(cli("audit", "verify", str(chain)), 6, "no newline")


def test_a_line_copied_again_at_the_end_is_named(chain: Path) -> None:
    lines = raw_lines(chain)
    put_lines(chain, [*lines, lines[-1]])
    assert_bad_line(cli("audit", "verify", str(chain)), 7, "seq 6 where 7")


def test_cut_tail_and_edited_last_line_need_the_kept_hash(chain: Path) -> None:
    """The chain alone cannot see them; the last hash printed earlier can."""
    result = cli("audit", "verify", str(chain))
    kept = result.stdout.split("last hash ")[1].strip()
    lines = raw_lines(chain)
    write(chain, 1, start=7)  # the file grows after the hash was kept: still fine
    grown = cli("audit", "verify", "--expect-last", kept.upper(), str(chain))
    assert grown.exit_code == 0, grown.output
    assert "passes through the expected hash (line 6)" in grown.stdout
    put_lines(chain, lines[:4])  # lines 5 to 7 cut off
    assert cli("audit", "verify", str(chain)).exit_code == 0  # undetectable without the kept hash
    assert_bad_line(cli("audit", "verify", "--expect-last", kept, str(chain)), 4, "cut off the end")
    put_lines(chain, [*lines[:5], lines[5].replace(b"agent-6", b"agent-9")])
    assert_bad_line(cli("audit", "verify", "--expect-last", kept, str(chain)), 6, "last line was edited")


def test_verify_reports_bad_input_in_one_line(tmp_path: Path, chain: Path) -> None:
    result = cli("audit", "verify", "--expect-last", "abc", str(chain))
    assert result.exit_code != 0
    assert "64 hex digits" in result.stderr
    missing = cli("audit", "verify", str(tmp_path / "missing.jsonl"))
    assert missing.exit_code != 0
    assert "missing.jsonl" in missing.stderr
    assert "Traceback" not in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = cli("audit", "verify", str(empty))
    assert result.exit_code == 0
    assert f"0 lines, chain intact, last hash {GENESIS}" in result.stdout


def test_a_file_written_before_chaining_is_refused_at_line_1(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text('{"event":"issue","decision":"grant","rule":"client.approved"}\n')
    assert_bad_line(cli("audit", "verify", str(path)), 1, "not a chained audit line")


def test_an_overlong_line_is_named_and_not_held(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 2)
    with path.open("ab") as file:
        file.write(b'{"x":"' + b"y" * (MAX_LINE_BYTES + 10) + b'"}\n')
    write(path, 1, start=3)  # continues after the overlong line, whose hash it reads by chunks
    assert_bad_line(cli("audit", "verify", str(path)), 3, "longer than")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(min_value=2, max_value=8),
    data=st.data(),
)
def test_any_changed_byte_before_the_last_line_is_found_at_its_line(
    tmp_path_factory: pytest.TempPathFactory, count: int, data: st.DataObject
) -> None:
    """Changing any one byte of line k < last (into another byte, not a newline) breaks
    the chain at line k, or at k - 1 when the byte was in line k's own `prev`."""
    path = tmp_path_factory.mktemp("prop") / "audit.jsonl"
    write(path, count)
    lines = raw_lines(path)
    k = data.draw(st.integers(min_value=1, max_value=count - 1), label="k")
    line = bytearray(lines[k - 1])
    at = data.draw(st.integers(min_value=0, max_value=len(line) - 1), label="at")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b not in (line[at], 10)), label="byte")
    prev_at = lines[k - 1].index(b'"prev":"') + len(b'"prev":"')
    in_prev = prev_at <= at < prev_at + 64
    line[at] = byte
    lines[k - 1] = bytes(line)
    put_lines(path, lines)
    with pytest.raises(BrokenChain) as broken:
        verify(path)
    allowed = (k - 1, k) if in_prev else (k,)
    assert broken.value.line in allowed, (broken.value, at, in_prev)


# -- audit why ------------------------------------------------------------------------------------


@pytest.fixture
def decisions(tmp_path: Path) -> Path:
    """Two sessions of one client (the second with two tokens), another client, and the
    admin decisions on them, as the servicer and the HTTP door write them."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    approval = {
        "approved_by": "alice@platform",
        "approved_at": "2026-11-01T10:00:00Z",
        "approval_rule": "cimd.manual",
        "document_fingerprint": "sha256:abc",
        "owner": "team-agents",
    }
    grant(audit, "agent", session="s-1", jti="j-1a", door="http", **approval)
    grant(audit, "other", session="s-9", jti="j-9")
    grant(audit, "agent", session="s-2", jti="j-2a", client_secret="tbs_not-for-the-log")
    grant(audit, "agent", session="s-2", jti="j-2b")
    audit.record(event="issue", client_id="agent", audience=AUDIENCE, decision="refuse", rule="client.session_limit")
    audit.record(
        event="revoke_session",
        client_id="",
        audience="",
        decision="grant",
        rule="caller.admin",
        caller="ops",
        session="s-1",
    )
    audit.record(
        event="revoke_session",
        client_id="",
        audience="",
        decision="grant",
        rule="caller.admin",
        caller="ops",
        session="s-9",
    )
    audit.record(
        event="revoke_token",
        client_id="",
        audience="",
        decision="refuse",
        rule="caller.not_admin",
        caller="mcp-a",
        jti="j-2b",
    )
    audit.record(
        event="revoke_client", client_id="agent", audience="", decision="grant", rule="caller.admin", caller="ops"
    )
    audit.record(
        event="revoke_client", client_id="other", audience="", decision="grant", rule="caller.admin", caller="ops"
    )
    audit.close()
    return path


def why(*args: str, env: dict[str, str] | None = None) -> tuple[Result, dict[str, Any]]:
    result = cli("audit", "why", *args, env=env)
    return result, json.loads(result.stdout) if result.exit_code == 0 else {}


def test_why_a_session_names_its_grant_rule_approval_and_the_decisions_on_it(decisions: Path) -> None:
    result, answer = why("s-1", str(decisions))
    assert result.exit_code == 0, result.output
    assert answer["found_as"] == ["session"]
    assert answer["verified"] is True
    assert (answer["sessions"], answer["clients"]) == (["s-1"], ["agent"])
    assert [(d["line"], d["role"], d["event"]) for d in answer["decisions"]] == [
        (1, "let_in", "issue"),
        (6, "on_session", "revoke_session"),
        (9, "on_client", "revoke_client"),
    ]
    let_in = answer["decisions"][0]
    assert let_in["rule"] == "client.approved"
    assert {k: let_in[k] for k in ("client", "door", "auth_method", "binding", "scope")} == {
        "client": "agent",
        "door": "http",
        "auth_method": "client_secret",
        "binding": "dpop",
        "scope": "tools:call",
    }
    assert let_in["approval_rule"] == "cimd.manual"
    assert let_in["document_fingerprint"] == "sha256:abc"
    assert let_in["owners"] == {"approver": "alice@platform", "client_owner": "team-agents"}
    assert answer["decisions"][1]["owners"] == {"caller": "ops"}
    assert "prev" not in let_in


def test_why_a_jti_finds_its_grant_and_the_decisions_on_its_token_and_session(decisions: Path) -> None:
    result, answer = why("j-2b", "--file", str(decisions))
    assert result.exit_code == 0, result.output
    assert answer["found_as"] == ["jti"]
    assert [(d["line"], d["role"], d["rule"]) for d in answer["decisions"]] == [
        (4, "let_in", "client.approved"),
        (8, "on_token", "caller.not_admin"),
        (9, "on_client", "caller.admin"),
    ]
    session_result, session_answer = why("s-2", str(decisions))
    assert [d["jti"] for d in session_answer["decisions"] if d["role"] == "let_in"] == ["j-2a", "j-2b"]
    assert "tbs_not-for-the-log" not in session_result.stdout


def test_why_answers_2_when_nothing_matches_and_1_on_a_broken_chain(decisions: Path) -> None:
    result = cli("audit", "why", "s-404", str(decisions))
    assert result.exit_code == 2
    assert "no grant of session or token 's-404'" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    lines = raw_lines(decisions)
    lines[2] = lines[2].replace(b"agent", b"agenT")
    put_lines(decisions, lines)
    broken = cli("audit", "why", "s-1", str(decisions))
    assert broken.exit_code == 1
    assert "line 3:" in broken.stderr
    assert "--no-verify" in broken.stderr
    result, answer = why("s-1", "--no-verify", str(decisions))
    assert result.exit_code == 0, result.output
    assert answer["verified"] is False
    assert [d["line"] for d in answer["decisions"]] == [1, 6, 9]


def test_why_never_prints_a_token_or_secret(tmp_path: Path) -> None:
    """Even from a file it did not write (read with --no-verify): what it prints is redacted."""
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl"
    path = tmp_path / "audit.jsonl"
    line = {
        "event": "issue",
        "decision": "grant",
        "rule": "client.approved",
        "client": "agent",
        "session": "s-1",
        "jti": "j-1",
        "access_token": token,
        "client_secret": "tbs_secret",
        "detail": f"Authorization: DPoP {token}",
    }
    path.write_text(json.dumps(line) + "\n")
    result, answer = why("s-1", "--no-verify", str(path))
    assert result.exit_code == 0, result.output
    assert token not in result.output
    assert "tbs_secret" not in result.output
    assert answer["decisions"][0]["access_token"] == REDACTED
    pasted = cli("audit", "why", token, "--no-verify", str(path))
    assert pasted.exit_code == 2
    assert token not in pasted.output
    assert "that is a token" in pasted.stderr


def test_why_reads_the_audit_file_setting(decisions: Path, tmp_path: Path, no_tokenbroker_env: None) -> None:
    result, answer = why("s-1", env={"TOKENBROKER_AUDIT_FILE": str(decisions)})
    assert result.exit_code == 0, result.output
    assert answer["file"] == str(decisions)
    unset = cli("audit", "why", "s-1", env={"TOKENBROKER_REGISTRY_FILE": str(tmp_path / "r.toml")})
    assert unset.exit_code == 1
    assert "no audit file" in unset.stderr


# -- end to end: a real broker's audit file ----------------------------------------------------------


def test_a_brokers_audit_file_verifies_and_says_why(tmp_path: Path) -> None:
    """`tokenbroker serve` writes the chain: a token from /token, its session revoked by
    an admin over gRPC; after a restart (the file continued) both are in one chain."""
    deployment = OAuthDeployment(tmp_path / "deployment")
    deployment.add_secret_client("bearer-agent", SECRET, binding="bearer")
    deployment.add_server("ops", (), ADMIN_KEY, admin=True)
    sessions = []
    for _ in range(2):  # the second broker continues the first one's file
        broker = deployment.broker()
        try:
            with http_client() as http:
                issued = secret_token(http, broker, "bearer-agent", SECRET, resource=AUDIENCE_A)
                assert issued.status_code == 200, issued.text
                sessions.append((issued.json()["session_id"], issued.json()["access_token"]))
                refused = secret_token(http, broker, "bearer-agent", "wrong-" + SECRET, resource=AUDIENCE_A)
                assert refused.status_code in (400, 401), refused.text
            with BrokerClient(broker.target, api_key=ADMIN_KEY, timeout=5) as admin:
                admin.revoke_session(sessions[-1][0])
        finally:
            assert broker.stop() == 0, broker.log.read_text()[-2000:]
    audit_file = str(deployment.audit_file)
    verified = cli("audit", "verify", audit_file)
    assert verified.exit_code == 0, verified.output
    assert f"{len(raw_lines(deployment.audit_file))} lines, chain intact" in verified.stdout
    session, token = sessions[1]
    result, answer = why(session, audit_file)
    assert result.exit_code == 0, result.output
    assert token not in result.output
    roles = [(d["role"], d["event"], d["decision"]) for d in answer["decisions"]]
    assert roles == [("let_in", "issue", "grant"), ("on_session", "revoke_session", "grant")]
    let_in, revoked = answer["decisions"]
    assert (let_in["door"], let_in["client"], let_in["binding"]) == ("http", "bearer-agent", "bearer")
    assert revoked["owners"] == {"caller": "ops"}
