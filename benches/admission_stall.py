"""Issue 8 item 1, measured: authenticated ValidateToken latency with and without 200
stalled anonymous calls open (calls that send headers and never their message), and
unary throughput, against one real `tokenbroker serve` (memory store) on 127.0.0.1.

    .venv/bin/python benches/admission_stall.py [--calls 2000] [--stalled 200] [--seconds 3]

Prints one JSON object. Everything runs on loopback and ends within seconds."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from tokenbroker import Keyring
from tokenbroker.client import BrokerClient
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker_bench.servers import free_port

ISSUER = "https://broker.bench.test"
AUDIENCE = "https://mcp.bench.test/mcp"
API_KEY = "key-bench-" + "k" * 40
SECRET = "secret-bench-" + "s" * 40


def start_broker(workdir: Path, message_timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    Keyring.generate().save(workdir / "keys.json")
    registry = FileRegistry(workdir / "registry.toml")
    registry.add_client(
        ClientRecord(
            "agent",
            status=ClientStatus.APPROVED,
            secret_hash=hash_secret(SECRET),
            allowed_audiences=(AUDIENCE,),
            binding=Binding.BEARER,
        )
    )
    registry.add_server(ServerRecord("server", audiences=(AUDIENCE,), api_key_hash=hash_secret(API_KEY)))
    target = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "TOKENBROKER_LISTEN": target,
        "TOKENBROKER_HTTP_LISTEN": "127.0.0.1:0",
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
        "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
        "TOKENBROKER_AUDIT_FILE": str(workdir / "audit.jsonl"),
        "TOKENBROKER_LOG_LEVEL": "warning",
        "TOKENBROKER_MESSAGE_TIMEOUT_SECONDS": str(message_timeout),
    }
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "serve"]
    log = (workdir / "broker.log").open("ab")
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with BrokerClient(target, timeout=0.5) as client:
                client.jwks()
            return process, target
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "broker.log").read_text()[-2000:]) from None
            time.sleep(0.1)


def latencies(target: str, token: str, count: int) -> list[float]:
    with BrokerClient(target, api_key=API_KEY, timeout=10) as client:
        for _ in range(50):  # warm up
            client.validate(token, audience=AUDIENCE)
        out = []
        for _ in range(count):
            started = time.perf_counter()
            if not client.validate(token, audience=AUDIENCE).valid:
                raise RuntimeError("the token did not validate")
            out.append(time.perf_counter() - started)
    return out


def throughput(target: str, token: str, threads: int, seconds: float) -> float:
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        with BrokerClient(target, api_key=API_KEY, timeout=10) as client:
            while time.monotonic() < stop:
                client.validate(token, audience=AUDIENCE)
                done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / seconds


def summary(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100)
    return {"p50_ms": round(cuts[49] * 1e3, 3), "p99_ms": round(cuts[98] * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # A long message deadline, so the stalled calls stay open while measuring.
        process, target = start_broker(Path(tmp), message_timeout=120)
        try:
            with BrokerClient(target, timeout=10) as client:
                token = client.issue(client_id="agent", client_secret=SECRET, audience=AUDIENCE).access_token
            result: dict[str, Any] = {"throughput_per_s": round(throughput(target, token, args.threads, args.seconds))}
            result["alone"] = summary(latencies(target, token, args.calls))
            release = threading.Event()

            def never() -> Iterator[bytes]:
                release.wait()
                yield from ()

            channels = [grpc.insecure_channel(target) for _ in range(4)]
            calls = []
            for i in range(args.stalled):
                path = "/tokenbroker.v1.TokenBroker/" + ("ValidateToken" if i % 2 else "IssueToken")
                call = channels[i % 4].stream_unary(path, request_serializer=None, response_deserializer=None)
                calls.append(call.future(never(), timeout=300))
            time.sleep(1.0)
            result["stalled"] = {"opened": len(calls), "still_open": sum(1 for c in calls if not c.done())}
            result["with_stalled"] = summary(latencies(target, token, args.calls))
            result["stalled"]["still_open_after"] = sum(1 for c in calls if not c.done())
            for c in calls:
                c.cancel()
            release.set()
            for ch in channels:
                ch.close()
            print(json.dumps(result))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)


if __name__ == "__main__":
    main()
