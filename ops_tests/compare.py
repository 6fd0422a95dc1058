"""Tensor comparisons for equivalence tests."""
from __future__ import annotations

import torch


def err_ratio(ref: torch.Tensor, x: torch.Tensor) -> float:
    """RMS(ref - x) / RMS(ref): robust to reduction-order noise in isolated elements, strict on the whole."""
    ref, x = ref.double(), x.double()
    denom = ref.pow(2).mean().sqrt().item()
    return (ref - x).pow(2).mean().sqrt().item() / max(denom, 1e-30)


def assert_state_close(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rel: float) -> None:
    assert ref.keys() == got.keys(), f"parameter names differ: {sorted(ref.keys() ^ got.keys())}"
    for name, r in ref.items():
        assert got[name].shape == r.shape, f"{name}: shape {tuple(got[name].shape)} != {tuple(r.shape)}"
        e = err_ratio(r, got[name])
        assert e <= rel, f"{name}: relative RMS error {e:.3g} > {rel:g}"
