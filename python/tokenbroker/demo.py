"""A short walk through the embedded broker: issue a DPoP-bound token, validate it, see a
replayed proof rejected, revoke the session. `make run` runs it."""

from __future__ import annotations

from tokenbroker import Broker, Keyring, ProofSigner

SERVER = "https://mcp.example.com/mcp"


def main() -> None:
    broker = Broker(Keyring.generate(), issuer="https://broker.example")
    client_key = ProofSigner()  # the client's DPoP key; the token is useless without it
    token = broker.issue(client_id="agent-7", audience=SERVER, scopes=["tools:call"], dpop_jkt=client_key.jkt)
    print(f"issued   {token.token_type} token, session {token.session_id}, expires at {token.expires_at}")

    proof = client_key.sign("POST", SERVER, token.access_token)
    first = broker.validate(token.access_token, audience=SERVER, dpop_proof=proof, http_method="POST", http_uri=SERVER)
    print(f"validate -> valid={first.valid} client={first.client_id} scopes={list(first.scopes)}")

    again = broker.validate(token.access_token, audience=SERVER, dpop_proof=proof, http_method="POST", http_uri=SERVER)
    print(f"replay   -> valid={again.valid} reason={again.reason.name} ({again.detail})")

    stolen = broker.validate(token.access_token, audience=SERVER, http_method="POST", http_uri=SERVER)
    print(f"no proof -> valid={stolen.valid} reason={stolen.reason.name}")

    other = broker.validate(
        token.access_token,
        audience="https://other.example.com/mcp",
        dpop_proof=client_key.sign("POST", "https://other.example.com/mcp", token.access_token),
        http_method="POST",
        http_uri="https://other.example.com/mcp",
    )
    print(f"other server -> valid={other.valid} reason={other.reason.name}")

    print(f"revoke session -> {broker.revoke_session(token.session_id)} revoked")
    fresh = client_key.sign("POST", SERVER, token.access_token)
    after = broker.validate(token.access_token, audience=SERVER, dpop_proof=fresh, http_method="POST", http_uri=SERVER)
    print(f"validate -> valid={after.valid} reason={after.reason.name}")


if __name__ == "__main__":
    main()
