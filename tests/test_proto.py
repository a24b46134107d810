"""The protobuf contract: the committed generated code is what `make proto` produces from
proto/tokenbroker/v1/broker.proto, and the wire enum is `tokenbroker.Reason`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenbroker import Reason
from tokenbroker.v1 import broker_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/tokenbroker/v1/broker.proto"
GENERATED = ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py")


def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            PROTO,
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "tokenbroker/v1" / name).read_bytes() != (ROOT / "python/tokenbroker/v1" / name).read_bytes()
    ]
    assert not stale, f"generated code is stale: {', '.join(stale)}; run `make proto` and commit the result"


def test_proto_reason_enum_is_tokenbroker_reason() -> None:
    wire = {name.removeprefix("REASON_"): number for name, number in broker_pb2.Reason.items()}
    assert wire == {reason.name: reason.value for reason in Reason}


def test_service_has_the_contract_rpcs() -> None:
    service = broker_pb2.DESCRIPTOR.services_by_name["TokenBroker"]
    assert service.full_name == "tokenbroker.v1.TokenBroker"
    assert {m.name for m in service.methods} == {
        "IssueToken",
        "ValidateToken",
        "ValidateTokenStream",
        "ValidateTokenBatch",
        "RevokeSession",
        "RevokeClient",
        "RevokeToken",
        "ListSessions",
        "GetJwks",
        "WatchEvents",
    }
    stream = service.methods_by_name["ValidateTokenStream"]
    assert stream.client_streaming
    assert stream.server_streaming
    watch = service.methods_by_name["WatchEvents"]
    assert not watch.client_streaming
    assert watch.server_streaming
