"""Synthetic English-like text for tests that need a corpus quickly."""
from __future__ import annotations

import numpy as np

WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than "
         "first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know king queen lord castle river storm night morning sword").split()


def english_ish(rng: np.random.Generator, n_words: int) -> str:
    lines = []
    for _ in range(max(1, n_words // 12)):
        words = rng.choice(WORDS, size=12)
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines) + "\n"
