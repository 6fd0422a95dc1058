"""data_pipeline stays below the other packages: it knows ranks only as integers."""
from __future__ import annotations

import ast
from pathlib import Path

import data_pipeline


def test_data_pipeline_imports_no_higher_package():
    forbidden = {"launcher", "parallel", "models", "kernels"}
    for path in Path(data_pipeline.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
