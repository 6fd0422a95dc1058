"""Hostile files for the safety tests: a pickle that runs a command when loaded without weights_only."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class Payload:
    """Unpickled without weights_only, this calls os.system and creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_payload(ckpt: Path, rel: str, marker: Path) -> None:
    """Replace `rel` with a torch.save file whose unpickling runs a command; the manifest is made to match."""
    from kernels.fileio import file_sha256

    target = ckpt / rel
    torch.save({"state": torch.zeros(2), "payload": Payload(marker)}, target)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][rel] = {"bytes": target.stat().st_size, "sha256": file_sha256(target)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
