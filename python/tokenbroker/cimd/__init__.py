"""Client ID Metadata Documents (MCP 2025-11-25): a `client_id` that is an `https://` URL
naming a JSON document with the client's keys.

`CimdFetcher` fetches documents with the SSRF guards, a per-host rate limit and a bounded
last-good cache (`fetch.py`); `check_document` / `load_client_document` decide whether a
document describes an acceptable client and compute the key thumbprints approval pins
(`document.py`); `trusted_domain_rule` matches `cimd_trusted_domains` (`trust.py`)."""

from __future__ import annotations

from tokenbroker.cimd.cache import FetchedDocument
from tokenbroker.cimd.document import ClientDocument, check_document, jwk_thumbprint, load_client_document
from tokenbroker.cimd.errors import CimdDocumentError, CimdFetchError, DocumentFailure, FetchFailure
from tokenbroker.cimd.fetch import CimdFetcher, Connector, Resolver
from tokenbroker.cimd.trust import check_trusted_domains, trusted_domain_rule
from tokenbroker.cimd.url import parse_cimd_url

__all__ = [
    "CimdDocumentError",
    "CimdFetchError",
    "CimdFetcher",
    "ClientDocument",
    "Connector",
    "DocumentFailure",
    "FetchFailure",
    "FetchedDocument",
    "Resolver",
    "check_document",
    "check_trusted_domains",
    "jwk_thumbprint",
    "load_client_document",
    "parse_cimd_url",
    "trusted_domain_rule",
]
