"""Shared test set-up: one model cache for the session, quiet logs, a helper to build small trainers."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("AA_LIGHTNING_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "aa_lightning"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Lightning's launchers call torch.set_num_threads(OMP_NUM_THREADS or their own guess) for every strategy setup;
# an unset OMP_NUM_THREADS lets one in-process DeepSpeed test switch the rest of the session to 2 threads
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("AA_TEST_THREADS", "1"))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        yield


@pytest.fixture(autouse=True)
def _restore_env():
    """Strategies export RANK/WORLD_SIZE/MASTER_ADDR/...; later tests must not take themselves for launched ranks.

    (The world-size-1 process group itself stays alive: DeepSpeed caches process groups in module globals.)
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def repo_path():
    def path(*parts: str) -> str:
        return os.path.join(REPO, *parts)

    return path


def _one_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and 2 threads on a busy 2-core machine are ~20x slower."""
    import torch

    torch.set_num_threads(int(os.environ.get("AA_TEST_THREADS", "1")))


_one_thread()
