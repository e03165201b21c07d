"""Checkpoints that are never half-written: write next to the target under a temporary name, then rename.

Files (``AtomicCheckpointIO``) and DeepSpeed checkpoint directories (``AtomicDeepSpeedCheckpoints``) both go
through a temporary sibling whose name records the writer, ``.tmp-<pid>.<start>@<host>+<token>.<name>``
(``start``: the process start time, so a reused pid is not mistaken for the writer). A save that is killed
leaves only such a sibling; the next save (or resume) in that directory removes it once its writer is gone, and
never touches a sibling whose writer is still running (another process saving there now).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "AtomicDeepSpeedCheckpoints",
    "remove_stale_partial_saves",
    "replace_path",
    "temporary_sibling",
]

# .tmp-<pid>.<start>@<host>+<token>.<name>: the save in progress; .old-...: the previous version, for an instant
_STAMPED = re.compile(
    r"^\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:\.(?P<start>\d+))?@(?P<host>[^+/]*)\+[0-9a-f]+\.(?P<name>.+)$"
)
# what saves wrote before names were stamped (tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt"))
_UNSTAMPED = re.compile(r"^\.tmp-[0-9a-z_]{8}\.ckpt$")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def temporary_sibling(path: str, kind: str = "tmp") -> str:
    """A fresh name next to ``path`` that records this process (``kind`` is ``tmp`` or ``old``)."""
    directory, name = os.path.split(os.path.abspath(path))
    pid = os.getpid()
    start = _process_start(pid)
    writer = f"{pid}.{start}" if start else str(pid)
    return os.path.join(directory, f".{kind}-{writer}@{socket.gethostname()}+{secrets.token_hex(4)}.{name}")


def _writer_is_gone(pid: int, start: str | None, host: str) -> bool:
    """True only when the writer surely no longer runs; processes of other machines cannot be checked."""
    if host != socket.gethostname() or os.name == "nt":
        return False
    running_start = _process_start(pid)
    if start and running_start:
        return running_start != start  # a different process now has that pid (e.g. a restarted container)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def _remove(path: str) -> None:
    """Remove a file or directory tree; one already gone (another rank cleaned it) is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def remove_stale_partial_saves(directory: str) -> list[str]:
    """Delete what killed saves left in ``directory``; returns the removed paths.

    A previous version parked by an interrupted directory swap is put back when its checkpoint is missing.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        match = _STAMPED.match(name)
        if match is None:
            if _UNSTAMPED.match(name):
                _remove(path)
                removed.append(path)
            continue
        if not _writer_is_gone(int(match["pid"]), match["start"], match["host"]):
            continue
        target = os.path.join(directory, match["name"])
        if match["kind"] == "old" and not os.path.lexists(target):
            try:  # the swap died between its two renames: the previous checkpoint wins
                os.rename(path, target)
            except FileNotFoundError:  # another rank restored it first
                continue
            log.warning("restored %s, which an interrupted save had moved aside", target)
            continue
        _remove(path)
        removed.append(path)
    if removed:
        log.warning(
            "removed %d partial checkpoint(s) of interrupted saves: %s",
            len(removed),
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def _fsync_directory(directory: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())


def replace_path(tmp: str, target: str) -> None:
    """Put the finished ``tmp`` (file or directory) at ``target``.

    A file replaces atomically (``os.replace``). A directory cannot replace a non-empty one in one call, so the
    old one is first renamed aside (``.old-...``), then removed; were the process killed between the two
    renames, :func:`remove_stale_partial_saves` puts the old one back.
    """
    directory = os.path.dirname(os.path.abspath(target))
    if not (os.path.isdir(tmp) and os.path.lexists(target)):
        os.replace(tmp, target)
        _fsync_directory(directory)
        return
    old = temporary_sibling(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    _fsync_directory(directory)
    _remove(old)


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash while saving leaves the previous checkpoint intact (``os.replace`` is atomic)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, storage_options: Any = None) -> None:
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        remove_stale_partial_saves(directory)
        tmp = temporary_sibling(path)
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            replace_path(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Resuming is the start of a run: clear what killed saves left next to the checkpoint first."""
        if isinstance(path, (str, os.PathLike)):
            remove_stale_partial_saves(os.path.dirname(os.path.abspath(os.fspath(path))))
        return super().load_checkpoint(path, *args, **kwargs)


class AtomicDeepSpeedCheckpoints:
    """Mixin for a ``DeepSpeedStrategy``: its checkpoint directories appear complete or not at all.

    Every rank writes its shards into one temporary sibling directory (named by rank 0, broadcast); after a
    barrier, rank 0 renames it into place, and a second barrier keeps every rank from going on (or loading)
    before the checkpoint is there. Assumes, as DeepSpeed's own checkpointing does, that all ranks see one
    shared filesystem.
    """

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        target = os.path.abspath(os.fspath(self.broadcast(filepath)))
        tmp = None
        if self.is_global_zero:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            remove_stale_partial_saves(os.path.dirname(target))
            tmp = temporary_sibling(target)
        tmp = self.broadcast(tmp)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("aa_checkpoint_written")
            if self.is_global_zero:
                _fsync_tree(tmp)
                replace_path(tmp, target)
        except BaseException:
            if self.is_global_zero and os.path.lexists(tmp):
                _remove(tmp)
            raise
        self.barrier("aa_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.is_global_zero and isinstance(checkpoint_path, (str, os.PathLike)):
            remove_stale_partial_saves(os.path.dirname(os.path.abspath(os.fspath(checkpoint_path))))
        self.barrier("aa_checkpoint_cleaned")
        return super().load_checkpoint(checkpoint_path, weights_only)
