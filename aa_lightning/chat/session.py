"""One chat conversation with a model: its messages, the media attached to them, and streamed replies.

Every turn is encoded exactly as a prompt-only training row is (why: the model should see at chat time the
prompt it was trained and rolled out on): the conversation goes through the datamodules' encoder
(:class:`~aa_lightning.data.encoding.SampleEncoder`, or :class:`~aa_lightning.data.multimodal.MultimodalSampleEncoder`
for a model with a processor) and their prompt-only collator, so the chat template, BOS rule, media
placeholders, media decoding and processor call are the ones of ``aa fit``; nothing here re-implements them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, TextStreamer

from aa_lightning.batch import model_inputs
from aa_lightning.chat.loading import LoadedChatModel
from aa_lightning.data.collators import TextCollator
from aa_lightning.data.encoding import SampleEncoder
from aa_lightning.data.media import MEDIA_KEYS, MediaLoader, resolve_media
from aa_lightning.data.multimodal import MultimodalCollator, MultimodalSampleEncoder
from aa_lightning.data.processor_alignment import ProcessorInfo
from aa_lightning.data.templating import ChatRenderer
from aa_lightning.models.turns import end_of_turn_token_ids

__all__ = ["ChatError", "ChatSession", "GenerationSettings"]

KIND_KEYS = {kind: key for key, kind in MEDIA_KEYS.items()}  # "image" -> "images"


class ChatError(ValueError):
    """A mistake of the user's (a missing media file, a media kind the model cannot take): shown, not fatal."""


@dataclass
class GenerationSettings:
    """The sampling flags of ``aa chat``; a fresh ``GenerationConfig`` is built from exactly these, so a
    checkpoint's own defaults (sampling on, a repetition penalty) never change what the flags say."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ChatError(
                f"--temperature must be > 0 (use --do_sample false for greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ChatError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ChatError(f"--top_k must be >= 0 (0: no top-k), got {self.top_k}")

    def config(self, eos_token_ids: list[int], pad_token_id: int | None) -> GenerationConfig:
        sampling = (
            {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None}
            if self.do_sample
            else {"temperature": None, "top_p": None, "top_k": None}
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            **sampling,
        )


class _Streamer(TextStreamer):
    """``TextStreamer`` that writes to a chosen stream (the terminal) and flushes every piece."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@dataclass
class ChatSession:
    """A conversation with ``loaded`` (see :func:`~aa_lightning.chat.loading.load_chat_model`).

    ``attach`` queues media for the next user message; ``send`` adds that message, streams the reply to
    ``out`` and returns it. With ``transcript`` set, every turn's templated prompt, the token ids that
    reached the model and the reply are written there as JSON after the turn.
    """

    loaded: LoadedChatModel
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    transcript: str | None = None
    num_frames: int = 8
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (media key, reference)
    turns: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        tokenizer, processor = self.loaded.tokenizer, self.loaded.processor
        self.renderer = ChatRenderer(tokenizer, processor, self.loaded.model_class)
        limit = self.loaded.max_length
        self.info = ProcessorInfo(processor, tokenizer) if processor is not None else None
        self.loader = MediaLoader(
            sampling_rate=self.info.sampling_rate if self.info else None, num_frames=self.num_frames
        )
        if self.info is not None and self.info.placeholders:
            self.encoder: SampleEncoder = MultimodalSampleEncoder(
                tokenizer, self.renderer, self.info, max_length=limit, media_root=os.getcwd()
            )
            self.collator: Any = MultimodalCollator(processor, self.info, "prompt_only", self.loader)
        else:
            self.encoder = SampleEncoder(tokenizer, self.renderer, max_length=limit)
            self.collator = TextCollator(tokenizer.pad_token_id, "prompt_only")
        model = self.loaded.model
        eos = {int(i) for i in end_of_turn_token_ids(tokenizer, processor)}
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos.update([source] if isinstance(source, int) else list(source or []))
        if not eos:
            raise ChatError("the tokenizer has no EOS token and the chat template no end-of-turn token")
        self.eos_token_ids = sorted(eos)

    # -- conversation state --------------------------------------------------------------------------
    def media_kinds(self) -> list[str]:
        """The media kinds this model takes (``image``, ``audio``, ``video``)."""
        return [MEDIA_KEYS[key] for key in (self.info.placeholders if self.info else {})]

    def attach(self, kind: str, path: str) -> str:
        """Queue the media file ``path`` for the next user message; checked (found and decodable) now."""
        key = KIND_KEYS.get(kind)
        if key is None:
            raise ChatError(f"unknown media kind {kind!r}; use one of {', '.join(KIND_KEYS)}")
        if kind not in self.media_kinds():
            takes = ", ".join(self.media_kinds()) or "text only"
            raise ChatError(f"this model takes no {kind} input (it takes: {takes})")
        if not path.strip():
            raise ChatError(f"/{kind} needs a file path")
        try:
            ref = resolve_media(path.strip(), f"/{kind}", os.getcwd(), kind)
            self.loader.check(key, ref)
        except ValueError as err:  # DataFormatError: file not found / cannot decode
            raise ChatError(str(err)) from None
        self.pending.append((key, ref))
        return ref.get("path", "")

    def reset(self) -> None:
        """Forget the conversation and any attached media (the system prompt stays)."""
        self.messages.clear()
        self.pending.clear()

    def conversation(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def media_meta(self) -> dict[str, list[dict[str, Any]]]:
        """Every media reference of the conversation by meta key, in the order their placeholders appear."""
        meta: dict[str, list[dict[str, Any]]] = {}
        for message in self.messages:
            for part in message.get("_media", ()):
                meta.setdefault(part[0], []).append(part[1])
        return meta

    # -- one turn ------------------------------------------------------------------------------------
    def user_message(self, text: str) -> dict[str, Any]:
        """The next user message: its media parts first (in the order attached), then the text."""
        if not self.pending:
            return {"role": "user", "content": text}
        parts: list[dict[str, Any]] = [{"type": MEDIA_KEYS[key]} for key, _ in self.pending]
        return {
            "role": "user",
            "content": [*parts, {"type": "text", "text": text}],
            "_media": list(self.pending),
        }

    def encode(self) -> dict[str, Any]:
        """The prompt-only batch of the conversation so far (generation prompt appended)."""
        conversation = [{k: v for k, v in m.items() if k != "_media"} for m in self.conversation()]
        try:
            sample = self.encoder.prompt_only(conversation, self.media_meta())
        except ValueError as err:  # PromptTooLongError, DataFormatError
            raise ChatError(f"{err} (type /reset to start a new conversation)") from None
        batch = self.collator([sample])
        batch["_prompt_text"] = sample["prompt_text"]
        return batch

    @torch.no_grad()
    def send(self, text: str, out: TextIO) -> str:
        """Add the user message ``text``, stream the reply to ``out`` and return it (added to the conversation)."""
        message = self.user_message(text)
        self.messages.append(message)
        try:
            batch = self.encode()
        except Exception:
            self.messages.pop()  # the media stay attached: the user can fix the text and send again
            raise
        self.pending.clear()
        model = self.loaded.model
        inputs = {k: v.to(self.loaded.device) for k, v in model_inputs(batch, model).items()}
        config = self.settings.config(self.eos_token_ids, self.loaded.tokenizer.pad_token_id)
        streamer = _Streamer(self.loaded.tokenizer, out)
        try:
            sequences = model.generate(**inputs, generation_config=config, streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C stopped the reply: the unanswered message leaves the conversation
            self.messages.pop()
            raise
        reply_ids = sequences[0, inputs["input_ids"].shape[1] :].tolist()
        reply = self.loaded.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        self.record(batch, inputs, reply, reply_ids)
        return reply

    def record(self, batch: dict[str, Any], inputs: dict[str, Any], reply: str, reply_ids: list[int]) -> None:
        """Append the turn to ``turns`` and, with ``transcript`` set, rewrite that JSON file."""
        media = {key: [ref.get("path") for ref in refs] for key, refs in self.media_meta().items()}
        self.turns.append(
            {
                "prompt": batch["_prompt_text"],
                "input_ids": inputs["input_ids"][0].tolist(),
                "media": media,
                "reply": reply,
                "reply_ids": reply_ids,
            }
        )
        if self.transcript:
            with open(self.transcript, "w", encoding="utf-8") as handle:
                json.dump({"model": self.loaded.path, "turns": self.turns}, handle, indent=1)
