"""README's support matrix is the one the harness and spec validation generate (no hand edits drift)."""
from __future__ import annotations

from pathlib import Path

import support_matrix


def test_readme_support_matrix_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin, end = readme.index(support_matrix.BEGIN), readme.index(support_matrix.END) + len(support_matrix.END)
    assert readme[begin:end] == support_matrix.render(), "regenerate: python ops_tests/parallel/support_matrix.py"
