"""The conformance suite on the embedded backend (tantivy + usearch + SQLite), with real files."""

import pytest

from search.embedded import EmbeddedIndex, plain_text_query
from tests.conformance import IndexConformance


class TestEmbeddedIndex(IndexConformance):
    @pytest.fixture
    def open_index(self):
        return EmbeddedIndex


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path):
    first = EmbeddedIndex(tmp_path / "index")
    try:
        with pytest.raises(ValueError):
            EmbeddedIndex(tmp_path / "index")
    finally:
        first.close()


def test_plain_text_query_drops_syntax_and_operators():
    assert plain_text_query('Vitamin: "D" AND (bone*) -x ~2^3 OR NOT') == "vitamin d and bone x 2 3 or not"
