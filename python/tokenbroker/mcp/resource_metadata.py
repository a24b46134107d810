"""RFC 9728 protected resource metadata: moved to `tokenbroker.resource_metadata` (the
gateway door serves it too, without the MCP SDK); kept here for existing imports."""

from tokenbroker.resource_metadata import (
    DPOP_SIGNING_ALGS,
    WELL_KNOWN_PATH,
    ProtectedResourceMetadata,
    check_http_url,
    resource_metadata_path,
    resource_metadata_url,
)

__all__ = [
    "DPOP_SIGNING_ALGS",
    "WELL_KNOWN_PATH",
    "ProtectedResourceMetadata",
    "check_http_url",
    "resource_metadata_path",
    "resource_metadata_url",
]
