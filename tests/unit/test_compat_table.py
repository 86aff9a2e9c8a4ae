"""docs/serving.md's compatibility table is the one the matrix tests last wrote (tests/integration/compat.py)."""

import json
from pathlib import Path

from tests.integration import compat

ROOT = Path(__file__).resolve().parents[2]


def test_the_matrix_markdown_is_rendered_from_its_recorded_results():
    recorded = json.loads((compat.RESULTS / "matrix.json").read_text())
    assert set(recorded) == set(compat.ROWS), "every row of the matrix has a recorded result"
    assert (compat.RESULTS / "matrix.md").read_text() == compat.markdown(recorded)


def test_the_serving_doc_shows_the_matrix_as_the_tests_recorded_it():
    doc = (ROOT / "docs" / "serving.md").read_text()
    assert (compat.RESULTS / "matrix.md").read_text() in doc, \
        "copy results/compat/matrix.md (written by the compat tests) into docs/serving.md"
