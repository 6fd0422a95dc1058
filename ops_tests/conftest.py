"""Suite-wide settings: quiet CPU threading, caches that survive between runs, an isolated job registry."""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # shared harness modules (spawn_ranks, ...) for tests and the processes they spawn
# The repository root goes first: ops_tests/ has folders named like the packages (models/, parallel/),
# which would otherwise shadow them as namespace packages in spawned processes.
sys.path.insert(0, str(HERE.parent))

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lmforge" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One corpus download per machine, shared by the data tests and the end-to-end jobs.
os.environ.setdefault("LMFORGE_CACHE", str(Path.home() / ".cache" / "lmforge"))
