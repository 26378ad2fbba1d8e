"""The Elasticsearch adapter translates client errors at the edge (no server needed)."""

from __future__ import annotations

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, ConnectionError, ConnectionTimeout

from archive_kms.errors import AliasConflictError, SearchError, ServiceUnavailableError
from archive_kms.search import IndexMode
from archive_kms.search.elasticsearch import ElasticsearchSearchIndex


def api_error(status: int, etype: str, reason: str = "boom") -> ApiError:
    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "127.0.0.1", 9200),
    )
    return ApiError(etype, meta=meta, body={"error": {"type": etype, "reason": reason}, "status": status})


class Raising:
    """A stand-in client whose every call raises ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.indices = self

    def options(self, **_kw):
        return self

    def __getattr__(self, name):
        def call(*_a, **_kw):
            raise self.exc

        return call


@pytest.mark.parametrize(
    "exc, expected",
    [
        (api_error(429, "es_rejected_execution_exception"), ServiceUnavailableError),
        (api_error(503, "cluster_block_exception"), ServiceUnavailableError),
        (api_error(500, "internal"), ServiceUnavailableError),
        (ConnectionError("refused"), ServiceUnavailableError),
        (ConnectionTimeout("timed out"), ServiceUnavailableError),
        (api_error(400, "illegal_argument_exception"), SearchError),
        (api_error(403, "security_exception"), SearchError),
    ],
)
def test_errors_are_translated_and_name_the_resource(exc, expected):
    index = ElasticsearchSearchIndex(Raising(exc))
    with pytest.raises(expected) as err:
        index.count("archive-acme--3")
    assert err.value.resource == "archive-acme--3" and "archive-acme--3" in str(err.value)
    assert err.value.retryable is (expected is ServiceUnavailableError)
    assert err.value.__cause__ is None  # the vendor exception (and its request) is not chained


def test_error_text_from_elasticsearch_is_sanitised():
    exc = api_error(
        400,
        "document_parsing_exception",
        "failed to parse field [display]. Preview of field's value: 'TOP SECRET CUSTOMER TEXT'",
    )
    with pytest.raises(SearchError) as err:
        ElasticsearchSearchIndex(Raising(exc)).refresh("archive-acme--1")
    assert "TOP SECRET" not in str(err.value) and "document_parsing_exception" in str(err.value)


def test_a_second_write_index_on_the_alias_is_a_conflict():
    class OneAliasCluster:
        def __init__(self):
            self.indices = self

        def options(self, **_kw):
            return self

        def exists(self, index):
            return True

        def get_alias(self, name):
            return {}  # the alias looked absent when we read it...

        def update_aliases(self, actions):  # ...but a racer created it meanwhile
            raise api_error(
                500,
                "illegal_state_exception",
                "alias [archive-acme] has more than one write index [archive-acme--2,archive-acme--1]",
            )

    with pytest.raises(AliasConflictError):
        ElasticsearchSearchIndex(OneAliasCluster()).swap_alias("acme", "archive-acme--2", expected_current=None)


def test_create_generation_translates_unreachable():
    with pytest.raises(ServiceUnavailableError):
        ElasticsearchSearchIndex(Raising(ConnectionError("down"))).create_generation("acme", 1, IndexMode.KEYED)
