"""The model cache shared by tiny aliases, embedded models and the benchmark model (aa_lightning.models.cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aa_lightning.models.cache import build_once, cache_root


def test_cache_root_order_and_tilde(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AA_LIGHTNING_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("AA_LIGHTNING_CACHE")
    assert cache_root() == Path.home() / ".cache" / "aa_lightning"
    assert cache_root("~/x") == Path.home() / "x"


def test_builds_once_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "models" / "m"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


def test_failed_build_leaves_nothing_and_stale_leftovers_are_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    target = models / "m"

    def broken(out: Path) -> None:
        (out / "half").write_text("h")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        build_once(target, broken)
    assert not target.exists() and not list(models.glob(".m.tmp-*"))

    (models / ".m.tmp-crashed").mkdir()  # what a killed process leaves behind
    target.mkdir()  # a folder without its completion mark
    (target / "partial").write_text("p")
    build_once(target, lambda out: (out / "done").write_text("d"), complete=lambda p: (p / "done").is_file())
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert not list(models.glob(".m.tmp-*"))
