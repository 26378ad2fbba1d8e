"""Search: the SearchIndex port, its backends, the keyed tokenizer and the rebuild ETL.

Callers use the port types, ``derive_search_keys`` (the keychain derives a tenant's
search keys from its tenant key), ``build_document`` and ``rebuild_generation``. Backends
are built by the caller (``ElasticsearchSearchIndex(clients.elasticsearch_client())`` or
``MemorySearchIndex()``) and imported from their modules, so importing this package never
imports the Elasticsearch client.
"""

from archive_kms.search.documents import build_document
from archive_kms.search.naming import alias_name, index_name
from archive_kms.search.port import (
    BulkItemError,
    BulkResult,
    GenerationInfo,
    Hit,
    HitFailure,
    IndexDocument,
    IndexMode,
    Query,
    SearchIndex,
    SearchResult,
)
from archive_kms.search.rebuild import RebuildReport, rebuild_generation
from archive_kms.search.tokens import SearchKeys, derive_search_keys

__all__ = [
    "BulkItemError",
    "BulkResult",
    "GenerationInfo",
    "Hit",
    "HitFailure",
    "IndexDocument",
    "IndexMode",
    "Query",
    "RebuildReport",
    "SearchIndex",
    "SearchKeys",
    "SearchResult",
    "alias_name",
    "build_document",
    "derive_search_keys",
    "index_name",
    "rebuild_generation",
]
