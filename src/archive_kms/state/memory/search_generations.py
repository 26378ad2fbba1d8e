"""The search-generation registry in memory (``SearchGenerationRepo``): each record is
kept as its JSON bytes, as SQL keeps it, so tests can edit the raw rows."""

from __future__ import annotations

from archive_kms.domain.search_generations import SearchGeneration
from archive_kms.state.memory.tables import MemoryTables

__all__ = ["MemorySearchGenerationRepo"]


class MemorySearchGenerationRepo(MemoryTables):
    """``SearchGenerationRepo`` in memory."""

    def record_search_generation(self, record: SearchGeneration) -> SearchGeneration:
        with self._lock:
            body = self._search_generations.setdefault((record.tenant_id, record.generation), record.to_json())
        return SearchGeneration.from_json(body)

    def search_generations(self, tenant_id: str) -> list[SearchGeneration]:
        with self._lock:
            rows = sorted((g, b) for (t, g), b in self._search_generations.items() if t == tenant_id)
        return [SearchGeneration.from_json(b) for _, b in rows]
