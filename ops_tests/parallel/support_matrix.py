"""README's support matrix, generated from the layout harness's parameter list and spec validation.

A cell is "tested" when the harness (`test_layouts.CASES`) runs that architecture in that layout;
otherwise it is what `launcher submit` answers for such a spec (the validation error, naming the
key and the reason), or "not tested" if validation would let it through untested.

    python ops_tests/parallel/support_matrix.py      # prints the table README carries
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

from test_layouts import ARCHS, CASES, LAYOUTS  # noqa: E402

ARCHITECTURES = ("transformer", "deltanet", "moeut", "rmt", "memoryformer", "recurformer")
# Layouts users ask for that the harness does not run: what validation says about them.
REFUSED = {"pp2-zero2": dict(pp=2, zero=2), "dp2-zero3": dict(dp=2, zero=3),
           "pp2xep2": dict(pp=2, dp=2, ep=2, zero=1), "tp2xep2": dict(tp=2, dp=2, ep=2, zero=1)}
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def _sets(arch: str, layout: dict) -> list[str]:
    world = 1
    for axis in ("tp", "pp", "dp", "cp"):
        world *= layout.get(axis, 1)
    # data.global_batch: a whole number of micro-batches on every data-parallel rank (local.yaml's micro 8)
    keys = {"model.arch": arch, "cluster.workers": world, "parallel.zero": layout.get("zero", 1),
            "data.global_batch": 8 * max(layout.get("dp", 1), 2),
            "parallel.sequence_parallel": str(layout.get("sp", False)).lower(),
            "train.activation_checkpointing": str(layout.get("ckpt", False)).lower()}
    keys |= {f"parallel.{axis}": layout[axis] for axis in ("tp", "pp", "dp", "cp", "ep") if axis in layout}
    return [f"{k}={v}" for k, v in keys.items()]


def _refusal(arch: str, layout: dict) -> str | None:
    from launcher.errors import SpecError
    from launcher.spec import load_spec
    from launcher.validate import validate

    try:
        validate(load_spec(HERE.parents[1] / "cluster_configs" / "local.yaml", _sets(arch, layout)))
    except SpecError as e:
        return f"refused: {e}"
    return None


def _cell(arch: str, name: str, layout: dict) -> str:
    variants = sorted(v for v, n in CASES if n == name and ARCHS[v][0] == arch)
    if variants:
        extra = [v.removeprefix(f"{arch}-") for v in variants if v != arch]
        return f"tested, ZeRO {layout.get('zero', 1)}" + "".join(f"; also {e}" for e in extra)
    return _refusal(arch, layout) or "not tested"


def render() -> str:
    import models

    archs = [a for a in ARCHITECTURES if a in models.names()]
    missing = [a for a in ARCHITECTURES if a not in archs]
    rows = ["| layout | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
    for name, layout in {**LAYOUTS, **REFUSED}.items():
        cells = [_cell(arch, name, layout).replace("|", "/") for arch in archs]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if missing:
        rows += ["", f"Not registered yet (every layout refused: `model.arch` allows {', '.join(archs)}): "
                     f"{', '.join(missing)}."]
    return "\n".join([BEGIN, *rows, END])


if __name__ == "__main__":
    print(render())
