"""The search-generation registry on SQL (``SearchGenerationRepo``): signed records kept
byte for byte; a generation is inserted once (the primary key settles a race)."""

from __future__ import annotations

from sqlalchemy import select

from archive_kms.domain.search_generations import SearchGeneration
from archive_kms.state.schema import search_generations
from archive_kms.state.sql.database import SqlRepository

__all__ = ["SqlSearchGenerationRepo"]


class SqlSearchGenerationRepo(SqlRepository):
    """``SearchGenerationRepo`` on SQL."""

    def record_search_generation(self, record: SearchGeneration) -> SearchGeneration:
        g = search_generations.c
        with self._tx("record search generation") as conn:
            conn.execute(
                self._insert(search_generations)
                .values(
                    tenant_id=record.tenant_id,
                    generation=record.generation,
                    body=record.to_json(),
                    recorded_at=record.recorded_at,
                )
                .on_conflict_do_nothing(index_elements=["tenant_id", "generation"])
            )
            body = conn.execute(
                select(g.body).where(g.tenant_id == record.tenant_id, g.generation == record.generation)
            ).scalar_one()
        return SearchGeneration.from_json(bytes(body))

    def search_generations(self, tenant_id: str) -> list[SearchGeneration]:
        g = search_generations.c
        with self._tx("list search generations", write=False) as conn:
            bodies = conn.execute(select(g.body).where(g.tenant_id == tenant_id).order_by(g.generation)).scalars().all()
        return [SearchGeneration.from_json(bytes(b)) for b in bodies]
