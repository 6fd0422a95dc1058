"""data_pipeline stays below the other packages: it knows ranks only as integers."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import data_pipeline
import kernels
from kernels import fileio

# The one exception: the repository's single atomic writer and file sha256 (STYLE.md "one helper per job"),
# which checkpoints and job state use too. It imports only the standard library (checked below), so it brings
# no torch, model or rank knowledge with it.
SHARED = {"kernels.fileio"}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_data_pipeline_imports_no_higher_package():
    forbidden = {"launcher", "parallel", "models", "kernels"}
    for path in Path(data_pipeline.__file__).parent.glob("*.py"):
        names = [n for n in _imports(path) if n not in SHARED]
        assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"


def test_the_shared_file_helpers_need_only_the_standard_library():
    # kernels/__init__ runs on that import too: it must stay as light.
    for path in (Path(fileio.__file__), Path(kernels.__file__)):
        extra = {n.split(".")[0] for n in _imports(path)} - set(sys.stdlib_module_names) - {"__future__"}
        assert not extra, f"{path} imports {sorted(extra)}"
