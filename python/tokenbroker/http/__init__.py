"""The OAuth 2.1 authorization server that standard MCP clients speak (`http_listen`):
RFC 8414 metadata, the token endpoint (client credentials with RFC 7523 client assertions
or secrets, RFC 8707 resources, RFC 9449 DPoP binding and nonces), the JWKS, RFC 7662
introspection and RFC 7009 revocation. `tokenbroker serve` runs it beside the gRPC
server, in the same process and on the same broker (see `tokenbroker.http.server`)."""
