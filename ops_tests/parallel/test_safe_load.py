"""No code runs from a checkpoint: every file type of a real DeepSpeed checkpoint, rewritten to carry a pickle
payload (manifest rewritten to match, as an attacker would), is refused by the loader itself, naming the file,
and the payload never runs. The honest checkpoint loads back exactly."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from payloads import Payload, plant_payload
from spawn_ranks import spawn_ranks

VOCAB, SEQ = 128, 16


def _engine():
    import models
    from parallel.engine import EngineConfig, build_engine

    cfg = models.make_config("transformer", "tiny", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=SEQ)
    return build_engine(models.build(cfg, seed=0), EngineConfig(micro_batch=2, grad_accum=1, dp=1, zero=1, lr=1e-2,
                                                                warmup_steps=1, total_steps=4))


def _save_tamper_load(rank: int, world: int, root: str) -> dict:
    import shutil

    from parallel import checkpoint, safe_load
    from parallel.step import train_step

    engine = _engine()
    train_step(engine, [torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))],
               torch.device("cpu"))
    honest = checkpoint.save(engine, Path(root), 1, {"step": 1, "data": {}}, {"world": 1}, keep=5)
    files = sorted(str(p.relative_to(honest)) for p in honest.rglob("*.pt"))
    safe_load.refuse_unsafe(honest)  # what we write passes the static scan
    fresh = _engine()
    assert checkpoint.load(fresh, honest)["step"] == 1
    same = all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(), fresh.module.state_dict().values()))
    refused: dict[str, str] = {}
    for i, rel in enumerate(files):
        bad = Path(root) / f"step_{10 + i}"
        shutil.copytree(honest, bad)
        marker = Path(root) / f"ran_{i}"
        plant_payload(bad, rel, marker)
        assert checkpoint.verify(bad) is None  # the manifest no longer protects: the loader must
        try:
            checkpoint.load(_engine(), bad)
        except safe_load.UnsafeFileError as e:
            refused[rel] = str(e)
        assert not marker.exists(), f"the payload in {rel} ran"
    return {"files": files, "refused": refused, "same": same}


def test_every_pickled_file_of_a_checkpoint_is_refused_by_the_loader():
    with tempfile.TemporaryDirectory() as root:
        out = spawn_ranks(_save_tamper_load, 1, root)[0]
    assert out["same"], "the honest checkpoint did not load back exactly"
    names = {Path(f).name for f in out["files"]}
    # Our RNG file, DeepSpeed's model states and ZeRO's optimizer states: the load path reads each.
    assert {"rng_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names, names
    assert set(out["refused"]) == set(out["files"]), f"loaded without refusal: {set(out['files']) - set(out['refused'])}"
    for rel, msg in out["refused"].items():
        assert rel in msg and "posix.system" in msg and "\n" not in msg, msg


def test_static_scan_names_the_payload_and_the_allowed_names_are_the_loaders(tmp_path):
    from parallel import safe_load

    marker = tmp_path / "ran"
    torch.save({"ok": torch.ones(1)}, tmp_path / "a.pt")
    torch.save([Payload(marker)], tmp_path / "b.pt")
    assert safe_load.unsafe_globals(tmp_path / "a.pt") == []
    assert safe_load.unsafe_globals(tmp_path / "b.pt") == ["posix.system"]
    try:
        safe_load.refuse_unsafe(tmp_path)
        raise AssertionError("refuse_unsafe accepted a payload")
    except safe_load.UnsafeFileError as e:
        assert "b.pt" in str(e) and "posix.system" in str(e)
    try:
        safe_load.safe_torch_load(tmp_path / "b.pt")
        raise AssertionError("safe_torch_load accepted a payload")
    except safe_load.UnsafeFileError as e:
        assert "b.pt" in str(e)
    assert not marker.exists()
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in safe_load.allowed_globals()}
    assert allowed == set(safe_load.ALLOWED_NAMES)
