"""The models a task asks for, loaded once per run: language models that generate and explain answers, and
score models (reward / cost) that rate them.

Why one pool: a suite of tasks names the same model several times (the policy in five tasks, one reward model
for the win rate and the preference accuracy); each is loaded once. Prompts and answers are encoded by the
datamodules' encoder and collators (the chat template, BOS rule and media handling of ``aa fit``), so a model
is evaluated on exactly the text it was trained on. Models load with ``trust_remote_code`` off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from aa_lightning.batch import model_inputs
from aa_lightning.chat.loading import load_chat_model, resolve_chat_path
from aa_lightning.chat.session import GenerationSettings
from aa_lightning.data.collators import TextCollator
from aa_lightning.data.encoding import SampleEncoder
from aa_lightning.data.media import MediaLoader
from aa_lightning.data.multimodal import MultimodalCollator, MultimodalSampleEncoder
from aa_lightning.data.processor_alignment import ProcessorInfo
from aa_lightning.data.templating import ChatRenderer, Conversation
from aa_lightning.models.loading import load_pretrained_models
from aa_lightning.models.registry import MODEL_REGISTRY, load_config
from aa_lightning.models.score_model import has_score_head
from aa_lightning.models.turns import end_of_turn_token_ids

__all__ = ["EvalModel", "ModelPool", "ScoreModelError"]


class ScoreModelError(ValueError):
    """A path given as a reward/cost model holds no trained score head (it would score at random)."""


class EvalModel:
    """One loaded model with the encoder of its family: ``generate``, ``log_likelihoods`` and ``scores``."""

    def __init__(
        self, path: str, model: torch.nn.Module, tokenizer: Any, processor: Any, device: torch.device
    ) -> None:
        self.path, self.model, self.tokenizer, self.processor, self.device = (
            path,
            model,
            tokenizer,
            processor,
            device,
        )
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        self.renderer = ChatRenderer(tokenizer, processor, MODEL_REGISTRY.get(model_type, None))
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_length = int(getattr(text_config, "max_position_embeddings", None) or 1 << 30)
        self.info = ProcessorInfo(processor, tokenizer) if processor is not None else None
        self.loader = MediaLoader(sampling_rate=self.info.sampling_rate if self.info else None)
        if self.info is not None and self.info.placeholders:
            self.encoder: SampleEncoder = MultimodalSampleEncoder(
                tokenizer, self.renderer, self.info, max_length=self.max_length, media_root=os.getcwd()
            )
        else:
            self.encoder = SampleEncoder(tokenizer, self.renderer, max_length=self.max_length)

    @property
    def multimodal(self) -> bool:
        return isinstance(self.encoder, MultimodalSampleEncoder)

    def collate(self, samples: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        if self.multimodal:
            assert self.info is not None
            return MultimodalCollator(self.processor, self.info, kind, self.loader)(samples)
        return TextCollator(self.tokenizer.pad_token_id, kind)(samples)

    def inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in model_inputs(batch, self.model).items()}

    def eos_token_ids(self) -> list[int]:
        eos = {int(i) for i in end_of_turn_token_ids(self.tokenizer, self.processor)}
        generation_config = getattr(self.model, "generation_config", None)
        for source in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
            eos.update([source] if isinstance(source, int) else list(source or []))
        return sorted(eos)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Conversation],
        metas: Sequence[dict[str, Any]] | None = None,
        settings: GenerationSettings | None = None,
        media_root: str | None = None,
    ) -> list[str]:
        """The reply to each prompt conversation (one batch, left-padded; greedy unless ``settings`` sample)."""
        self.set_media_root(media_root)
        metas = metas or [{} for _ in prompts]
        samples = [self.encoder.prompt_only(list(p), dict(m)) for p, m in zip(prompts, metas)]
        batch = self.collate(samples, "prompt_only")
        inputs = self.inputs(batch)
        config = (settings or GenerationSettings()).config(self.eos_token_ids(), self.tokenizer.pad_token_id)
        sequences = self.model.generate(**inputs, generation_config=config)
        new = sequences[:, inputs["input_ids"].shape[1] :]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def set_media_root(self, root: str | None) -> None:
        """Relative media paths of the next rows resolve against ``root`` (their data file's folder)."""
        if root is not None and self.multimodal:
            self.encoder.media_root = root  # type: ignore[attr-defined]

    def _supervised(
        self,
        conversations: Sequence[Conversation],
        metas: Sequence[dict[str, Any]] | None,
        media_root: str | None = None,
        train_on: str = "all_assistant",
    ) -> dict[str, Any]:
        """Encoded as SFT encodes them; ``train_on`` picks the labelled assistant turns (all, or the last)."""
        self.set_media_root(media_root)
        metas = metas or [{} for _ in conversations]
        previous, self.encoder.train_on = self.encoder.train_on, train_on
        try:
            samples = [self.encoder.supervised(list(c), dict(m)) for c, m in zip(conversations, metas)]
        finally:
            self.encoder.train_on = previous
        return self.collate(samples, "supervised")

    @torch.no_grad()
    def log_likelihoods(
        self,
        conversations: Sequence[Conversation],
        metas: Sequence[dict[str, Any]] | None = None,
        media_root: str | None = None,
        train_on: str = "all_assistant",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum, count)`` of the log-probs of each conversation's assistant tokens (as SFT labels them);
        ``train_on="last_assistant"``: only the final reply's (the response of a multi-turn preference row)."""
        from aa_lightning.algorithms.logprobs import output_log_probs

        batch = self._supervised(conversations, metas, media_root, train_on)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = output_log_probs(self.model, batch)
        return out.sum.float().cpu(), out.token_count.cpu()

    @torch.no_grad()
    def scores(
        self,
        conversations: Sequence[Conversation],
        metas: Sequence[dict[str, Any]] | None = None,
        media_root: str | None = None,
    ) -> torch.Tensor:
        """The end score of each whole conversation (a reward or cost model; read at its end-of-turn token)."""
        batch = self._supervised(conversations, metas, media_root)
        output = self.model(**self.inputs(batch))  # a ScoreModel (ModelPool.score loads every format as one)
        return output.end_scores.float().cpu()


class ModelPool:
    """Loads each ``(path, kind)`` once; ``kind`` is ``lm`` (generate / log-likelihood) or ``score``."""

    def __init__(self, device: str = "auto", dtype: str = "auto") -> None:
        self.device, self.dtype = device, dtype
        self.loaded: dict[tuple[str, str], EvalModel] = {}
        self.pipelines: dict[tuple[str, str], torch.nn.Module] = {}

    def target(self) -> torch.device:
        """``auto``: this rank's GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU."""
        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device(self.device)

    def lm(self, name_or_path: str) -> EvalModel:
        key = (name_or_path, "lm")
        if key not in self.loaded:
            chat = load_chat_model(  # this rank's device: "auto" there would be GPU 0 on every rank
                name_or_path, device=str(self.target()), dtype=self.dtype, trust_remote_code=False
            )
            self.loaded[key] = EvalModel(chat.path, chat.model, chat.tokenizer, chat.processor, chat.device)
        return self.loaded[key]

    def pipeline(self, name_or_path: str) -> torch.nn.Module | None:
        """The model class of a diffusers pipeline folder (it samples media itself), or None for any other."""
        from aa_lightning.models.diffusion_pipeline_io import is_pipeline_folder

        path = resolve_chat_path(name_or_path)
        if not is_pipeline_folder(path):
            return None
        key = (name_or_path, "pipeline")
        if key not in self.pipelines:
            model, _, _ = load_pretrained_models(path, dtype=self.dtype, trust_remote_code=False)
            self.pipelines[key] = model.to(self.target()).eval()
        return self.pipelines[key]

    def score(self, name_or_path: str) -> EvalModel:
        """A reward / cost model: a folder with a trained score head, or a sequence-classification export."""
        key = (name_or_path, "score")
        if key in self.loaded:
            return self.loaded[key]
        path = resolve_chat_path(name_or_path)
        if has_score_head(path):
            # both formats load as a ScoreModel: a seqcls export with num_labels != 1 is refused (its first
            # logit is no score), and the end score is read at the last attended token
            model, tokenizer, processor = load_pretrained_models(
                path, dtype=self.dtype, score_model=True, padding_side="right", trust_remote_code=False
            )
        else:
            kind = load_config(path, trust_remote_code=False).model_type if os.path.isdir(path) else "?"
            raise ScoreModelError(
                f"{name_or_path}: no trained score head (score_head.safetensors) and no "
                f"*ForSequenceClassification export; a {kind} checkpoint would score at random. Point the "
                "reward/cost model at the hf_model export of an `aa fit` reward- or cost-model run"
            )
        device = self.target()
        model.to(device).eval()
        self.loaded[key] = EvalModel(path, model, tokenizer, processor, device)
        return self.loaded[key]
