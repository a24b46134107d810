"""What an MCP request touches: moved to `tokenbroker.jsonrpc_resource` (the gateway doors
read it too, without the MCP SDK); kept here for existing imports."""

from tokenbroker.jsonrpc_resource import MAX_BODY, MAX_NAME, MAX_RESOURCE, MAX_RESOURCE_BYTES, resource_of

__all__ = ["MAX_BODY", "MAX_NAME", "MAX_RESOURCE", "MAX_RESOURCE_BYTES", "resource_of"]
