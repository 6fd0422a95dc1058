"""Faults made on purpose, for the tests of fault handling. Read from each rank's environment (a test sets
them through `cluster.env`, which also shows that `cluster.env` reaches every rank); unset, nothing happens.

- `LMFORGE_INJECT_SLOW_CHECKPOINT=STEP:SECONDS[:ATTEMPT]`: every rank spends SECONDS more inside the
  checkpoint of step STEP (all ranks alike, so no collective waits on a slower peer), as a checkpoint to slow
  storage would; with ATTEMPT, only in that attempt of the driver session (0: the first start).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("lmforge." + __name__)

SLOW_CHECKPOINT = "LMFORGE_INJECT_SLOW_CHECKPOINT"


def checkpoint_delay_s(step: int, attempt: int = 0) -> float:
    """Seconds to add to the checkpoint of `step` in `attempt` (0 unless injected)."""
    value = os.environ.get(SLOW_CHECKPOINT)
    if not value:
        return 0.0
    at, seconds, *only = value.split(":")
    if int(at) != step or (only and int(only[0]) != attempt):
        return 0.0
    log.warning("%s=%s: this checkpoint is slowed by %s s on purpose", SLOW_CHECKPOINT, value, seconds)
    return float(seconds)
