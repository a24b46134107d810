"""The gateway doors: how an MCP server in any language, behind a gateway, is protected.

Two front doors, one validation (`tokenbroker.gateway.door`):
- forward auth, `GET|POST /authz` on the HTTP port (`tokenbroker.gateway.forward_auth`),
  the convention nginx's `auth_request`, Traefik's `forwardAuth` and Caddy's
  `forward_auth` share;
- Envoy's external authorization, `envoy.service.auth.v3.Authorization/Check` on the gRPC
  port (`tokenbroker.gateway.envoy`).

The gateway authenticates as a registered server (API key or, under Envoy, mTLS); the
audience is the original request's scheme, host and path, and must be one of its own. The
client's address is believed only from `trusted_proxies` (`tokenbroker.gateway.proxies`).
Shipped configurations: `contrib/gateways/`."""
