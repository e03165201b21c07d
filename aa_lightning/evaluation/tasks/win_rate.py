"""Win rate of model A against model B under a reward model, on the same prompts (align-anything's models_pk).

Both models answer every prompt with the same generation settings; the reward model scores both turns.
``win_rate`` counts a tie (equal rewards) as half a win, and B samples from the random state A started from,
so two copies of one model give the same replies and score exactly 0.5.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.data.sources import media_root
from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalRow, RowResult
from aa_lightning.evaluation.tasks.generative import GenerativeTask
from aa_lightning.evaluation.tasks.prompts import prompt_text


def random_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's CPU and CUDA generator states (sampling draws from both, depending on the device)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def set_random_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


@register_task("win_rate")
class WinRate(GenerativeTask):
    """Reward-model win rate of the run's model (A, or ``model``) against ``model_b`` on the same prompts.

    Args:
        model_b: the model compared against (e.g. the base model before training).
        reward_model: the judge.
        responses_b_field: read B's replies from this field instead of generating them.
    """

    metrics = ("win_rate", "reward_a", "reward_b")
    default_prompt_format = "{prompt}"

    def __init__(
        self,
        data: Any,
        model_b: str | None = None,
        reward_model: str | None = None,
        responses_b_field: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        if not reward_model:
            raise ValueError(f"task {self.name}: set `reward_model` (the judge of the two replies)")
        if not model_b and not responses_b_field:
            raise ValueError(f"task {self.name}: set `model_b` (the model A is compared against)")
        self.model_b, self.reward_model, self.responses_b_field = model_b, reward_model, responses_b_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        prompts, metas = self.ask(rows)
        state = random_state()  # B samples from A's random state: one model against itself ties exactly
        replies_a = self.replies(rows, prompts, metas, context)
        if self.responses_b_field:
            replies_b = [str(row.get(self.responses_b_field, str)) for row in rows]
        else:
            assert self.model_b is not None
            after_a = random_state()
            set_random_state(state)
            replies_b = self.replies(rows, prompts, metas, context, model=self.model_b)
            set_random_state(after_a)
        turns = [
            [*prompt, {"role": "assistant", "content": reply}]
            for replies in (replies_a, replies_b)
            for prompt, reply in zip(prompts, replies)
        ]
        assert self.reward_model is not None
        scores = context.pool.score(self.reward_model).scores(turns, metas + metas, media_root(self.spec()))
        n = len(prompts)
        out = []
        for i, prompt in enumerate(prompts):
            a, b = float(scores[i]), float(scores[n + i])
            win = 1.0 if a > b else 0.5 if a == b else 0.0
            record = {"prompt": prompt_text(prompt), "reply_a": replies_a[i], "reply_b": replies_b[i]}
            out.append(RowResult({"win_rate": win, "reward_a": a, "reward_b": b}, {**record, "a": a, "b": b}))
        return out
