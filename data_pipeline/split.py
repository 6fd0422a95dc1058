"""Deterministic document order, size cap and train/val split by document key."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from .corpus import Document
from .errors import DataError


def key_hash(key: str) -> str:
    """A stable, platform-independent hash: Python's hash() is salted per process."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def order_documents(docs: Sequence[Document]) -> list[Document]:
    """Order by key hash (stable within a key), so a size cap keeps a mix of sources."""
    return sorted(docs, key=lambda d: key_hash(d.key))  # sorted() is stable: same-key docs keep input order


def truncate(docs: Sequence[Document], max_bytes: int | None) -> list[Document]:
    """Keep the leading documents up to `max_bytes` of UTF-8, cutting the last one."""
    if max_bytes is None:
        return list(docs)
    out, left = [], max_bytes
    for d in docs:
        if left <= 0:
            break
        raw = d.text.encode("utf-8")
        if len(raw) > left:
            d = Document(d.key, raw[:left].decode("utf-8", errors="ignore"), d.source)
        out.append(d)
        left -= len(raw)
    return out


def val_keys(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The held-out keys: the first ceil(fraction * n) by key hash, at least 1, never all.

    With a single key there is nothing to hold out whole; the caller splits its tokens.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    unique = sorted(set(keys), key=key_hash)
    if len(unique) < 2:
        return set()
    n = min(max(1, math.ceil(val_fraction * len(unique))), len(unique) - 1)
    return set(unique[:n])
