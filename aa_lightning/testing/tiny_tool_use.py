"""``tiny-qwen2-tools``: the tiny random Qwen2 warm-started to call the calculator on a few arithmetic prompts.

A random 2048-token policy never writes a 30-token JSON tool call by chance, so a test or demo of tool-using
RL needs a policy that sometimes does, as an SFT'd chat model does. This one is trained (seeded, a few seconds
on one CPU thread) on the prompts of :data:`TOOL_TASKS` with two behaviours per prompt: one episode in
``1 / (1 + DIRECT_PER_TOOL)`` calls the calculator (``<tool_call>{...}</tool_call>``), reads the tool's answer
and answers ``#### <value>`` (right); the others answer ``#### 100`` at once (wrong). RL with an answer reward
then has something to learn: that calling the tool pays. The transcripts are tokenised exactly as a multi-turn
rollout builds them (:class:`~aa_lightning.algorithms.rl.multi_turn.ObservationRenderer`); only the policy's
tokens are trained on.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aa_lightning.testing.tiny_text import build_tiny_qwen2

__all__ = ["DIRECT_ANSWER", "TOOL_TASKS", "build_tiny_qwen2_tools", "tool_task_rows"]

#: (question, the expression a tool call computes): the prompts of ``configs/data/tool_arithmetic_4.jsonl``
TOOL_TASKS: list[tuple[str, str]] = [
    ("What is 37 times 23?", "37 * 23"),
    ("What is 912 divided by 8?", "912 / 8"),
    ("What is 45 plus 78 times 3?", "45 + 78 * 3"),
    ("What is 1234 minus 567?", "1234 - 567"),
]
DIRECT_ANSWER = "#### 100"  # the wrong guess of an episode that does not call the tool
DIRECT_PER_TOOL = 3  # direct episodes per tool episode in the warm-up data


def tool_task_rows() -> list[dict[str, str]]:
    """GSM8K-layout rows (``question``, ``answer`` ending in ``#### N``) of :data:`TOOL_TASKS`."""
    from aa_lightning.environments.tools import calculator

    return [{"question": q, "answer": f"#### {calculator(expr)}"} for q, expr in TOOL_TASKS]


def _transcripts(tokenizer: Any) -> list[tuple[list[int], list[bool], float]]:
    """``(token ids, trained?, weight)`` of every warm-up episode, laid out as a multi-turn rollout lays them
    out; a direct episode weighs ``DIRECT_PER_TOOL`` tool episodes."""
    from aa_lightning.environments.rendering import ObservationRenderer
    from aa_lightning.environments.tools import calculator, format_tool_call

    renderer = ObservationRenderer(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    out = []
    for question, expression in TOOL_TASKS:
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt = encode(prompt_text)
        call = encode(format_tool_call("calculator", {"expression": expression})) + [end]
        value = calculator(expression)
        observation = renderer.ids([{"role": "tool", "content": value}], end)
        answer = encode(f"#### {value}") + [end]
        tool = prompt + call + observation + answer
        trained = (
            [False] * len(prompt) + [True] * len(call) + [False] * len(observation) + [True] * len(answer)
        )
        out.append((tool, trained, 1.0))
        direct = encode(DIRECT_ANSWER) + [end]
        out.append((prompt + direct, [False] * len(prompt) + [True] * len(direct), float(DIRECT_PER_TOOL)))
    return out


def build_tiny_qwen2_tools(
    save_dir: str | os.PathLike, seed: int = 0, steps: int = 150, lr: float = 1e-2
) -> str:
    """The tiny Qwen2 of :func:`build_tiny_qwen2` after ``steps`` full-batch SFT steps on the warm-up episodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_qwen2(save_dir, seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    episodes = _transcripts(tokenizer)
    width = max(len(tokens) for tokens, _, _ in episodes)
    ids = torch.full((len(episodes), width), tokenizer.pad_token_id)
    trained = torch.zeros((len(episodes), width), dtype=torch.bool)
    attention = torch.zeros((len(episodes), width), dtype=torch.long)
    for i, (tokens, keep, _) in enumerate(episodes):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        attention[i, : len(tokens)] = 1
        trained[i, : len(tokens)] = torch.tensor(keep)
    weights = torch.tensor([w for _, _, w in episodes])[:, None] * trained[:, 1:].float()
    weights = weights / weights.sum()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.random.set_rng_state(generator_state)
    model.eval()
    model.save_pretrained(save_dir)
    return str(save_dir)
