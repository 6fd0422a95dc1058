"""Every op folder under kernels/ has the same shape (STYLE.md "Kernels"): the oracle in `reference.py`,
the pure-torch path in `torch_impl.py`, the Triton path in `triton_impl.py`, and the public functions
that choose between them (those taking `backend=`) in `dispatch.py`, so a reader finds the entry point
of any op at the same place."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import kernels

ROOT = Path(kernels.__file__).parent
OPS = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def test_every_op_folder_has_the_same_modules():
    assert {"delta_rule", "moe"} <= set(OPS)  # the glob found the op folders at all
    for op in OPS:
        have = {p.name for p in (ROOT / op).glob("*.py")}
        missing = {"dispatch.py", "reference.py", "torch_impl.py", "triton_impl.py"} - have
        assert not missing, f"kernels/{op}/ lacks {sorted(missing)}"


def test_public_entry_points_are_defined_in_dispatch():
    for op in OPS:
        pkg = importlib.import_module(f"kernels.{op}")
        entry = [name for name in pkg.__all__
                 if inspect.isfunction(getattr(pkg, name))
                 and "backend" in inspect.signature(getattr(pkg, name)).parameters]
        assert entry, f"kernels.{op} exports no function taking backend="
        for name in entry:
            assert getattr(pkg, name).__module__ == f"kernels.{op}.dispatch", (op, name)
