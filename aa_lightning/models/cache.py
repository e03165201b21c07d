"""The model cache: where built or converted models live, and how a folder gets there exactly once.

Tiny aliases (:mod:`.aliases`), embedded models (:mod:`.embedded`) and the benchmark model are all built on
first use. Several processes may ask at once (the DDP ranks of a node, two shells), and a build may be killed
half-way; so a folder is built in a temporary folder beside its target under a file lock, and renamed into
place only when complete: every reader sees it absent or whole.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["build_once", "cache_root", "file_lock"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$AA_LIGHTNING_CACHE``, else ``~/.cache/aa_lightning`` (``~`` expanded)."""
    root = cache_dir or os.environ.get("AA_LIGHTNING_CACHE") or "~/.cache/aa_lightning"
    return Path(root).expanduser()


@contextmanager
def file_lock(target: Path, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold the lock ``<target>.lock``; ``on_wait(lock_path)`` is called first if another process holds it."""
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(Path(lock.lock_file))
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(
    target: Path,
    build: Callable[[Path], object],
    *,
    complete: Callable[[Path], bool] = Path.exists,
    on_wait: Callable[[Path], None] | None = None,
) -> Path:
    """``target``, made by ``build(tmp)`` into an empty folder and renamed into place unless already complete.

    Under the lock, leftovers of an interrupted earlier build (``.<name>.tmp-*`` folders, a ``target`` that
    ``complete`` rejects) are removed first: whoever holds the lock owns them.
    """
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target, on_wait):
        if complete(target):  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)  # atomic on one filesystem: the folder is either absent or complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
