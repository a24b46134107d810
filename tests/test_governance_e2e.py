"""Approval expiry and accountability against a real `tokenbroker serve` and the real CLI:
an approval made with `clients approve --until` lets the client in until then, and no
longer; the grant's audit line names who approved it (issue 11, "Expiry", "Accountability")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime

from tokenbroker.registry import ClientStatus

from support.oauth import OAuthDeployment, claims_of, http_client, issuer_of, key_token, new_key, wait_for

CLI = [sys.executable, "-c", "from tokenbroker.cli import main; main()"]


def test_an_approval_ends_when_it_says_and_the_grant_names_its_approver(tmp_path) -> None:
    deployment = OAuthDeployment(tmp_path)
    key = new_key("ed25519")
    deployment.add_key_client("agent", key, status=ClientStatus.PENDING, owner="team-reports", binding="bearer")
    broker = deployment.broker()
    try:
        with http_client() as http:
            pending = key_token(http, broker, key, "agent")
            assert pending.status_code == 400, pending.text
            assert "tokenbroker clients approve agent" in pending.json()["error_description"]

            until = datetime.fromtimestamp(int(time.time()) + 4, UTC).isoformat()
            env = {**os.environ, "TOKENBROKER_REGISTRY_FILE": str(deployment.registry.path)}
            approved = subprocess.run(
                [*CLI, "clients", "approve", "agent", "--by", "alice", "--until", until],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert approved.returncode == 0, approved.stderr
            assert wait_for(lambda: key_token(http, broker, key, "agent").status_code == 200, timeout=5)
            granted = key_token(http, broker, key, "agent")
            jti = claims_of(granted.json()["access_token"])["jti"]
            [line] = [line for line in deployment.audit_lines() if line.get("jti") == jti]
            assert (line["approved_by"], line["approval_rule"], line["owner"]) == ("alice", "manual", "team-reports")

            assert wait_for(lambda: key_token(http, broker, key, "agent").status_code == 400, timeout=10)
            expired = key_token(http, broker, key, "agent")
            assert expired.json()["error"] == "unauthorized_client"
            assert "approval expired" in expired.json()["error_description"]
        assert wait_for(lambda: '"approval_expired"' in broker.log.read_text(), timeout=5)
        assert issuer_of(broker)  # the same broker throughout
    finally:
        broker.stop()
