"""The `tokenbroker` command line: run the broker (`serve`), manage its signing keys
(`keys`), its registry of MCP clients and servers (`clients`, `servers`), talk to a
running broker (`issue`, `validate`, `revoke`, `sessions`, `healthcheck`) and load-test
it (`bench`, from the separate `tokenbroker-bench` distribution).

Output meant for programs (tokens, validations, sessions, JSON) goes to stdout; messages
for people go to stderr. Errors a user can cause print one line and exit non-zero.

One module per command group; the root group (`_app`) imports a group's module only when
that group runs (or `--help` lists it), and each command imports what it needs (grpc,
redis, the service, cryptography) in its body, so `tokenbroker --help` or `tokenbroker
keys show` never pays for the gRPC stack."""

from tokenbroker.cli._app import main

__all__ = ["main"]
