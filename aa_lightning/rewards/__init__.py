"""Rule-based rewards for RL (PPO, GRPO, Safe-RLHF): a registry plus built-ins.

    from aa_lightning.rewards import register_reward

    @register_reward("mentions_paris")
    def mentions_paris(prompt: str, response: str, meta: dict) -> float:
        return float("paris" in response.lower())

Built-ins: ``gsm8k_answer``, ``format``, ``target_token_share``, ``response_length``, ``tool_call_format``;
on generated images (an image family's decoded responses): ``image_color``; a reward model or judge over
HTTP: ``remote``.
"""

from aa_lightning.rewards import builtin, image_rules, remote, tool_calls  # noqa: F401  (registers the built-ins)
from aa_lightning.rewards.builtin import (
    extract_final_answer,
    format_reward,
    gsm8k_answer,
    normalize_number,
    response_length,
    target_token_share,
)
from aa_lightning.rewards.image_rules import image_color
from aa_lightning.rewards.registry import (
    RegisteredReward,
    RewardSpec,
    WeightedRewards,
    available_rewards,
    get_reward,
    register_reward,
)
from aa_lightning.rewards.remote import RemoteRewardError, remote_reward
from aa_lightning.rewards.tool_calls import tool_call_format

__all__ = [
    "RegisteredReward",
    "RemoteRewardError",
    "RewardSpec",
    "WeightedRewards",
    "available_rewards",
    "extract_final_answer",
    "format_reward",
    "get_reward",
    "image_color",
    "gsm8k_answer",
    "normalize_number",
    "register_reward",
    "remote_reward",
    "response_length",
    "target_token_share",
    "tool_call_format",
]
