"""What the strategy matrix runs: algorithms (rows), strategy columns, and the combinations declared unsupported.

Every algorithm is built the way a user would build it, on the tiny models and the repository's real sample
data, with the smallest sizes that still run every code path: 8 rows of 128 tokens (64 would cut most
preference pairs down to identical pairs and drop most KTO rows), 256 with media, 4 new tokens per rollout.
``per_rank_batch`` halves the batch on 2-process columns so the GLOBAL batch (and hence the first step's
objective) is the same as on one process; data are not shuffled, so the global batch also holds the same rows
(rank ``r`` of ``W`` takes rows ``r, r + W, ...``).

Nothing heavy is imported at module level: pytest imports this file to parametrize the cells.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "configs", "data")
MEDIA = os.path.join(DATA, "media")
TINY_REWARD_MODEL = "tiny_reward_model"  # folder name under the matrix's output directory (see driver)

# ------------------------------------------------------------------------------------------------------
# algorithms
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildContext:
    """What a builder needs besides the algorithm: where the shared files are, the per-rank batch, LoRA."""

    out_dir: str  # the matrix's output folder (holds the shared tiny reward model)
    cell_dir: str  # this cell's own folder
    per_rank_batch: Callable[[int], int]  # global batch size -> batch size of one rank
    lora: Any = None  # a LoraConfig for the LoRA columns

    @property
    def reward_model(self) -> str:
        return os.path.join(self.out_dir, TINY_REWARD_MODEL)


@dataclass(frozen=True)
class Algorithm:
    """One row of the matrix.

    ``rl``: on-policy RL (manual optimization, rollouts sampled per rank). ``zero_at_start``: metrics that compare
    the policy with its reference; at the first step the two are the same model, so they are 0 (the ones the
    step logs must all be, on every strategy and precision).
    """

    name: str
    build: Callable[[BuildContext], tuple[Any, Any]]  # -> (LightningModule, LightningDataModule)
    rl: bool = False
    zero_at_start: tuple[str, ...] = ()


def _optim() -> Any:
    from aa_lightning.algorithms import OptimConfig

    return OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")


def _text_data(ctx: BuildContext, file: str, template: str, global_batch: int, **kwargs: Any) -> Any:
    from aa_lightning.data import TextToTextDataModule

    return TextToTextDataModule(
        "tiny-qwen2",
        train={"path": os.path.join(DATA, file), "template": template, "size": 8},
        max_length=128,
        batch_size=ctx.per_rank_batch(global_batch),
        shuffle=False,
        **kwargs,
    )


def _media_data(ctx: BuildContext, modality: str, file: str, template: str, global_batch: int) -> Any:
    from aa_lightning.data import TextAudioToTextDataModule, TextImageToTextDataModule

    datamodule = {"image": TextImageToTextDataModule, "audio": TextAudioToTextDataModule}[modality]
    model = {"image": "tiny-llava", "audio": "tiny-qwen2-audio"}[modality]
    return datamodule(
        model,
        train={"path": os.path.join(MEDIA, modality, file), "template": template},
        max_length=256,
        batch_size=ctx.per_rank_batch(global_batch),
        shuffle=False,
    )


def _rl_kwargs(ctx: BuildContext) -> dict[str, Any]:
    from aa_lightning.algorithms import GenerationConfig

    return dict(
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        rollout_seed=0,
        optim=_optim(),
        lora=ctx.lora,
    )


E_SHARE = {"name": "target_token_share", "kwargs": {"target": "e"}}


def build_sft(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import SFTModule

    return SFTModule("tiny-qwen2", optim=_optim(), lora=ctx.lora), _text_data(
        ctx, "alpaca_200.json", "Alpaca", 4
    )


def build_sft_skipping_nonfinite(ctx: BuildContext) -> tuple[Any, Any]:
    """``on_nonfinite: skip`` drops a step with a NaN loss; DeepSpeed's engine steps on its own, so it cannot."""
    from aa_lightning.algorithms import SFTModule

    module = SFTModule("tiny-qwen2", optim=_optim(), lora=ctx.lora, on_nonfinite="skip")
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_rm(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import RewardModule

    # a new score head, drawn from the seeded RNG (seed_everything runs before every cell)
    module = RewardModule("tiny-qwen2", optim=_optim(), lora=ctx.lora, center_coef=0.01, new_score_head=True)
    return module, _text_data(ctx, "hh_rlhf_train_128.jsonl", "HH-RLHF", 4)


def build_cost(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import CostModule

    module = CostModule("tiny-qwen2", optim=_optim(), lora=ctx.lora, new_score_head=True)
    return module, _text_data(ctx, "pku_saferlhf_train_24.json", "PKU-SafeRLHF-Safety", 4)


def build_dpo(ctx: BuildContext, precompute: bool = False) -> tuple[Any, Any]:
    from aa_lightning.algorithms import DPOModule

    module = DPOModule(
        "tiny-qwen2",
        beta=0.1,
        precompute_ref_log_probs=precompute,
        ref_cache_dir=os.path.join(ctx.cell_dir, "ref_logps"),
        optim=_optim(),
        lora=ctx.lora,
    )
    return module, _text_data(ctx, "hh_rlhf_train_128.jsonl", "HH-RLHF", 4)


def build_reference_free(ctx: BuildContext, loss_type: str) -> tuple[Any, Any]:
    from aa_lightning.algorithms import ORPOModule, SimPOModule

    named = {"simpo": SimPOModule, "orpo": ORPOModule}[loss_type]
    module = named("tiny-qwen2", optim=_optim(), lora=ctx.lora)
    return module, _text_data(ctx, "hh_rlhf_train_128.jsonl", "HH-RLHF", 4)


def build_kto(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import KTOModule

    module = KTOModule("tiny-qwen2", beta=0.1, optim=_optim(), lora=ctx.lora)
    return module, _text_data(ctx, "kto_train_72.json", "KTO", 4, train_on="last_assistant")


def build_ppo(ctx: BuildContext) -> tuple[Any, Any]:
    """PPO with a frozen reward model (a ScoreModel with a trained head); the critic starts from it."""
    from aa_lightning.algorithms import PPOModule

    module = PPOModule(
        "tiny-qwen2", reward_model_name_or_path=ctx.reward_model, kl_coef=0.05, **_rl_kwargs(ctx)
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_grpo(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import GRPOModule

    module = GRPOModule(
        "tiny-qwen2", reward_functions=[E_SHARE], num_generations=2, beta=0.04, **_rl_kwargs(ctx)
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_safe_rlhf(ctx: BuildContext) -> tuple[Any, Any]:
    """Rule reward, frozen cost model (the tiny ScoreModel); reward critic from the actor, cost critic from it."""
    from aa_lightning.algorithms import SafeRLHFModule

    module = SafeRLHFModule(
        "tiny-qwen2",
        reward_functions=[E_SHARE],
        cost_model_name_or_path=ctx.reward_model,
        cost_limit=0.0,
        kl_coef=0.05,
        **_rl_kwargs(ctx),
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_media_dpo(ctx: BuildContext, modality: str) -> tuple[Any, Any]:
    from aa_lightning.algorithms import DPOModule

    model = {"image": "tiny-llava", "audio": "tiny-qwen2-audio"}[modality]
    file, template = {"image": ("aa_ti2t.json", "AA_TI2T"), "audio": ("aa_ta2t.json", "AA_TA2T")}[modality]
    module = DPOModule(model, beta=0.1, optim=_optim(), lora=ctx.lora)
    return module, _media_data(ctx, modality, file, template, 2)


def build_media_ppo(ctx: BuildContext, modality: str) -> tuple[Any, Any]:
    """Rule reward; the critic starts from the actor (+ a zero value head)."""
    from aa_lightning.algorithms import PPOModule

    model = {"image": "tiny-llava", "audio": "tiny-qwen2-audio"}[modality]
    file, template = {
        "image": (os.path.join("rlaif_v", "detail_test_3_input.jsonl"), "RLAIF-V"),
        "audio": ("speech_asr.json", "Speech-ASR"),
    }[modality]
    module = PPOModule(model, reward_functions=[E_SHARE], kl_coef=0.05, **_rl_kwargs(ctx))
    return module, _media_data(ctx, modality, file, template, 2)


def _text_to_image_data(ctx: BuildContext, kind: str, file: str, template: str, global_batch: int) -> Any:
    from aa_lightning.data import TextToImageDataModule

    return TextToImageDataModule(
        "tiny-sd",
        train={"path": os.path.join(MEDIA, "text_to_image", file), "template": template},
        kind=kind,
        resolution=32,
        batch_size=ctx.per_rank_batch(global_batch),
        shuffle=False,
    )


def build_diffusion_sft(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged SFTModule on a text-to-image diffusion model (the loss is the denoising loss)."""
    from aa_lightning.algorithms import SFTModule

    module = SFTModule("tiny-sd", optim=_optim(), lora=ctx.lora)
    return module, _text_to_image_data(ctx, "supervised", "prompt_image.json", "T2I-Prompt-Image", 4)


def build_diffusion_dpo(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged DPOModule on a text-to-image diffusion model: Diffusion-DPO, beta as in the paper."""
    from aa_lightning.algorithms import DPOModule

    module = DPOModule("tiny-sd", beta=2500.0, optim=_optim(), lora=ctx.lora)
    return module, _text_to_image_data(ctx, "preference", "aa_t2i.json", "AA_T2I", 2)


def _image_token_data(
    ctx: BuildContext, kind: str, file: str, template: str, global_batch: int, model: str = "tiny-emu3"
) -> Any:
    """Text-to-image rows as image-token batches: Emu3's VQ tokens (4 x 4 codes at 32 px: 20 image tokens +
    3 end tokens) or Janus's codes (``model="tiny-janus"``)."""
    from aa_lightning.data import TextToImageTokensDataModule

    return TextToImageTokensDataModule(
        model,
        train={"path": os.path.join(MEDIA, "text_to_image", file), "template": template},
        kind=kind,
        resolution=32,
        batch_size=ctx.per_rank_batch(global_batch),
        shuffle=False,
    )


def build_image_token_sft(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged SFTModule on an autoregressive image-output model (Emu3: the image is VQ tokens)."""
    from aa_lightning.algorithms import SFTModule

    module = SFTModule("tiny-emu3", optim=_optim(), lora=ctx.lora)
    return module, _image_token_data(ctx, "supervised", "prompt_image.json", "T2I-Prompt-Image", 2)


def build_image_token_dpo(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged DPOModule on Emu3: chosen and rejected image tokens of one prompt."""
    from aa_lightning.algorithms import DPOModule

    module = DPOModule("tiny-emu3", beta=0.1, optim=_optim(), lora=ctx.lora)
    return module, _image_token_data(ctx, "preference", "aa_t2i.json", "AA_T2I", 2)


def build_image_token_grpo(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged GRPOModule on Emu3 image prompts: grid-constrained rollouts decoded for a rule reward."""
    from aa_lightning.algorithms import GRPOModule

    module = GRPOModule(
        "tiny-emu3",
        reward_functions=[{"name": "image_color", "kwargs": {"color": [255, 0, 0]}}],
        num_generations=2,
        beta=0.04,
        **_rl_kwargs(ctx),
    )
    return module, _image_token_data(ctx, "prompt_only", "pick_a_pic.json", "Pick-a-Pic", 2)


def build_janus_sft(ctx: BuildContext) -> tuple[Any, Any]:
    """The unchanged SFTModule on Janus image generation (the family scores its image codes itself)."""
    from aa_lightning.algorithms import SFTModule

    module = SFTModule("tiny-janus", optim=_optim(), lora=ctx.lora)
    return module, _image_token_data(
        ctx, "supervised", "prompt_image.json", "T2I-Prompt-Image", 4, "tiny-janus"
    )


def build_janus_dpo(ctx: BuildContext) -> tuple[Any, Any]:
    from aa_lightning.algorithms import DPOModule

    module = DPOModule("tiny-janus", beta=0.1, optim=_optim(), lora=ctx.lora)
    return module, _image_token_data(ctx, "preference", "aa_t2i.json", "AA_T2I", 2, "tiny-janus")


# --- issue 13: Online DPO, best-of-n (RAFT), DAPO ------------------------------------------------------


def build_online_dpo(ctx: BuildContext) -> tuple[Any, Any]:
    """Online DPO: 2 samples per prompt ranked by the rule reward, DPO's sigmoid loss against the reference."""
    from aa_lightning.algorithms import OnlineDPOModule

    module = OnlineDPOModule("tiny-qwen2", reward_functions=[E_SHARE], beta=0.1, **_rl_kwargs(ctx))
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_best_of_n(ctx: BuildContext) -> tuple[Any, Any]:
    """Best-of-n: 4 samples per prompt, the best one by the frozen reward model kept for an SFT step."""
    from aa_lightning.algorithms import BestOfNModule

    module = BestOfNModule(
        "tiny-qwen2",
        reward_model_name_or_path=ctx.reward_model,
        num_generations=4,
        top_k=1,
        **_rl_kwargs(ctx),
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


def build_grpo_dapo(ctx: BuildContext) -> tuple[Any, Any]:
    """DAPO's dynamic sampling (every prompt of a rank's batch must give a varied group: a drop makes every rank
    generate one more round, at most 2, then the cap tops up with zero-advantage groups) and overlong shaping."""
    from aa_lightning.algorithms import GRPOModule

    module = GRPOModule(
        "tiny-qwen2",
        reward_functions=[E_SHARE],
        num_generations=2,
        beta=0.04,
        clip_range_high=0.28,
        dynamic_sampling=True,
        max_generation_rounds=2,
        overlong_buffer_length=2,
        **_rl_kwargs(ctx),
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


DPO_REWARDS = ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins")
KTO_REWARDS = ("train/kl", "train/rewards/desirable", "train/rewards/undesirable")

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sft", build_sft),
        Algorithm("sft_skip_nonfinite", build_sft_skipping_nonfinite),
        Algorithm("rm", build_rm),
        Algorithm("cost", build_cost),
        Algorithm("dpo", build_dpo, zero_at_start=DPO_REWARDS),
        Algorithm("dpo_precomputed", lambda ctx: build_dpo(ctx, precompute=True), zero_at_start=DPO_REWARDS),
        Algorithm("simpo", lambda ctx: build_reference_free(ctx, "simpo")),
        Algorithm("orpo", lambda ctx: build_reference_free(ctx, "orpo")),
        Algorithm("kto", build_kto, zero_at_start=KTO_REWARDS),
        Algorithm("ppo", build_ppo, rl=True, zero_at_start=("rollout/kl",)),
        Algorithm("grpo", build_grpo, rl=True, zero_at_start=("train/kl",)),
        Algorithm("safe_rlhf", build_safe_rlhf, rl=True, zero_at_start=("rollout/kl",)),
        Algorithm("dpo_image", lambda ctx: build_media_dpo(ctx, "image"), zero_at_start=DPO_REWARDS),
        Algorithm(
            "ppo_image", lambda ctx: build_media_ppo(ctx, "image"), rl=True, zero_at_start=("rollout/kl",)
        ),
        Algorithm("dpo_audio", lambda ctx: build_media_dpo(ctx, "audio"), zero_at_start=DPO_REWARDS),
        Algorithm("sft_t2i", build_diffusion_sft),
        Algorithm("dpo_t2i", build_diffusion_dpo, zero_at_start=DPO_REWARDS),
        Algorithm("sft_t2itok", build_image_token_sft),
        Algorithm("dpo_t2itok", build_image_token_dpo, zero_at_start=DPO_REWARDS),
        Algorithm("grpo_t2itok", build_image_token_grpo, rl=True, zero_at_start=("train/kl",)),
        Algorithm("sft_t2ijanus", build_janus_sft),
        Algorithm("dpo_t2ijanus", build_janus_dpo, zero_at_start=DPO_REWARDS),
        Algorithm(
            "ppo_audio", lambda ctx: build_media_ppo(ctx, "audio"), rl=True, zero_at_start=("rollout/kl",)
        ),
        # issue 13 (onlinedpo helper)
        Algorithm("online_dpo", build_online_dpo, rl=True, zero_at_start=DPO_REWARDS),
        Algorithm("best_of_n", build_best_of_n, rl=True),
        Algorithm("grpo_dapo", build_grpo_dapo, rl=True, zero_at_start=("train/kl",)),
    )
}
# -- GRPO's advantage estimators and policy losses (issue 13, rlopts): one cell per option family ------------


def build_grpo_option(ctx: BuildContext, **options: Any) -> tuple[Any, Any]:
    from aa_lightning.algorithms import GRPOModule

    module = GRPOModule(
        "tiny-qwen2", reward_functions=[E_SHARE], num_generations=2, beta=0.04, **options, **_rl_kwargs(ctx)
    )
    return module, _text_data(ctx, "alpaca_200.json", "Alpaca", 4)


GRPO_OPTION_CELLS = ("grpo_rloo", "grpo_gspo", "grpo_reinforce_pp", "grpo_remax")
ALGORITHMS.update(
    {
        a.name: a
        for a in (
            Algorithm(
                "grpo_rloo",
                lambda ctx: build_grpo_option(ctx, advantage_estimator="rloo", loss_aggregation="bnpo"),
                rl=True,
                zero_at_start=("train/kl",),
            ),
            Algorithm(
                "grpo_gspo",
                lambda ctx: build_grpo_option(ctx, policy_loss="gspo", loss_aggregation="sequence_mean"),
                rl=True,
                zero_at_start=("train/kl",),
            ),
            Algorithm(  # KL folded into the reward: rollout/kl is the one to be 0 at the start
                "grpo_reinforce_pp",
                lambda ctx: build_grpo_option(ctx, advantage_estimator="reinforce_pp", policy_loss="cispo"),
                rl=True,
                zero_at_start=("rollout/kl",),
            ),
            Algorithm(  # one extra greedy generate per rollout
                "grpo_remax",
                lambda ctx: build_grpo_option(ctx, advantage_estimator="remax"),
                rl=True,
                zero_at_start=("train/kl",),
            ),
        )
    }
)
# -- multi-turn rollouts (issue 14, multiturn): GSM8K-layout arithmetic prompts, the answer_feedback user turn ----


def build_multi_turn(ctx: BuildContext, algorithm: str) -> tuple[Any, Any]:
    """Two policy turns per episode: a wrong answer (every answer of a random policy) gets a user turn asking
    again; cut turns are answered too, so every episode holds environment tokens between its policy turns."""
    from aa_lightning.algorithms import GRPOModule, PPOModule

    multi_turn = dict(environment="answer_feedback", max_turns=2, end_on_cut_turn=False)
    if algorithm == "grpo":
        module = GRPOModule(
            "tiny-qwen2",
            reward_functions=[E_SHARE],
            num_generations=2,
            beta=0.04,
            **multi_turn,
            **_rl_kwargs(ctx),
        )
    else:
        module = PPOModule(
            "tiny-qwen2", reward_functions=[E_SHARE], kl_coef=0.05, **multi_turn, **_rl_kwargs(ctx)
        )
    return module, _text_data(ctx, "tool_arithmetic_4.jsonl", "GSM8K", 4)


def build_multi_turn_image(ctx: BuildContext, algorithm: str) -> tuple[Any, Any]:
    """Qwen2-VL, the image in the first turn, a scripted follow-up user turn, cut turns answered."""
    from aa_lightning.algorithms import GRPOModule, PPOModule
    from aa_lightning.data import TextImageToTextDataModule

    multi_turn = dict(
        environment={"name": "scripted_user", "kwargs": {"replies": ["Look again."]}},
        max_turns=2,
        end_on_cut_turn=False,
    )
    cls, extra = (GRPOModule, dict(num_generations=2, beta=0.04)) if algorithm == "grpo" else (PPOModule, {})
    module = cls("tiny-qwen2-vl", reward_functions=[E_SHARE], **extra, **multi_turn, **_rl_kwargs(ctx))
    data = TextImageToTextDataModule(
        "tiny-qwen2-vl",
        train={
            "path": os.path.join(MEDIA, "image", "rlaif_v", "detail_test_3_input.jsonl"),
            "template": "RLAIF-V",
        },
        max_length=256,
        batch_size=ctx.per_rank_batch(2),
        shuffle=False,
    )
    return module, data


MULTI_TURN_CELLS = ("grpo_multi_turn", "ppo_multi_turn")
MULTI_TURN_IMAGE_CELLS = ("grpo_multi_turn_image", "ppo_multi_turn_image")  # single and zero3
ALGORITHMS.update(
    {
        "grpo_multi_turn": Algorithm(
            "grpo_multi_turn", lambda ctx: build_multi_turn(ctx, "grpo"), rl=True, zero_at_start=("train/kl",)
        ),
        "ppo_multi_turn": Algorithm(
            "ppo_multi_turn", lambda ctx: build_multi_turn(ctx, "ppo"), rl=True, zero_at_start=("rollout/kl",)
        ),
        "grpo_multi_turn_image": Algorithm(
            "grpo_multi_turn_image",
            lambda ctx: build_multi_turn_image(ctx, "grpo"),
            rl=True,
            zero_at_start=("train/kl",),
        ),
        "ppo_multi_turn_image": Algorithm(
            "ppo_multi_turn_image",
            lambda ctx: build_multi_turn_image(ctx, "ppo"),
            rl=True,
            zero_at_start=("rollout/kl",),
        ),
    }
)

TEXT = ("sft", "rm", "cost", "dpo", "dpo_precomputed", "simpo", "orpo", "kto", "ppo", "grpo", "safe_rlhf")
MEDIA_CELLS = ("dpo_image", "ppo_image", "dpo_audio", "ppo_audio")
# issue 13: the new online methods and RL options, in the single (reference), ddp and zero3 columns
ISSUE13_CELLS = ("online_dpo", "best_of_n", "grpo_dapo", *GRPO_OPTION_CELLS)
DIFFUSION_CELLS = ("sft_t2i", "dpo_t2i")  # a text-to-image diffusion model under the same modules
IMAGE_TOKEN_CELLS = (
    "sft_t2itok",
    "dpo_t2itok",
    "grpo_t2itok",
)  # autoregressive image outputs (Emu3's VQ tokens)
JANUS_CELLS = ("sft_t2ijanus", "dpo_t2ijanus")  # image codes scored by Janus's own head, same modules

# ------------------------------------------------------------------------------------------------------
# strategy columns
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One strategy column: how its Trainer is built, what it runs, what it is compared with.

    ``strategy``: ``auto`` (one CPU device), ``ddp`` (gloo), ``zero2``, ``zero3`` (every tensor sharded, see
    :func:`zero3_config`). ``reference``: the column whose first step this one must reproduce (None: it is a
    reference itself). ``tolerance`` scales the comparison tolerances (bf16 computes in 8-bit mantissas).
    """

    name: str
    strategy: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    lora: bool = False
    reference: str | None = "single"
    algorithms: tuple[str, ...] = TEXT
    tolerance: float = 1.0
    kind: str = "matrix"  # "matrix" or "configs" (the shipped ZeRO-3 configs' tiny twins)


COLUMNS: dict[str, Column] = {
    c.name: c
    for c in (
        Column(
            "single",
            reference=None,
            algorithms=TEXT
            + MEDIA_CELLS
            + DIFFUSION_CELLS
            + IMAGE_TOKEN_CELLS
            + JANUS_CELLS
            + ISSUE13_CELLS
            + MULTI_TURN_CELLS
            + MULTI_TURN_IMAGE_CELLS,
        ),
        Column("bf16", precision="bf16-mixed", tolerance=30.0),
        Column(
            "ddp",
            strategy="ddp",
            devices=2,
            algorithms=TEXT + DIFFUSION_CELLS + IMAGE_TOKEN_CELLS + ISSUE13_CELLS + MULTI_TURN_CELLS,
        ),
        Column("zero2", strategy="zero2"),
        # the refused cell comes last: a failed cell ends its process (see runner), and nothing is left to rerun
        Column(
            "zero3",
            strategy="zero3",
            algorithms=(
                *TEXT,
                *MEDIA_CELLS,
                *DIFFUSION_CELLS,
                *IMAGE_TOKEN_CELLS,
                *JANUS_CELLS,
                *ISSUE13_CELLS,
                *MULTI_TURN_CELLS,
                *MULTI_TURN_IMAGE_CELLS,
                "sft_skip_nonfinite",
            ),
        ),
        Column(
            "zero3_2p",
            strategy="zero3",
            devices=2,
            algorithms=TEXT + MEDIA_CELLS + DIFFUSION_CELLS + IMAGE_TOKEN_CELLS + MULTI_TURN_CELLS,
        ),
        # Janus joins the LoRA columns once (its DDP and 2-process ZeRO-3 runs were checked by hand: CI time)
        Column(
            "lora",
            lora=True,
            reference=None,
            algorithms=TEXT + IMAGE_TOKEN_CELLS + JANUS_CELLS + MULTI_TURN_CELLS,
        ),
        Column(
            "lora_zero3", strategy="zero3", lora=True, reference="lora", algorithms=TEXT + IMAGE_TOKEN_CELLS
        ),
        Column(
            "zero3_configs", strategy="deepspeed_cpu_stage_3", reference=None, algorithms=(), kind="configs"
        ),
    )
}


def lora_config() -> Any:
    """Adapters on every linear layer; no dropout, so 1- and 2-process runs see the same function."""
    from aa_lightning.algorithms import LoraConfig

    return LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def zero3_config() -> dict[str, Any]:
    """ZeRO-3 that shards EVERY tensor: the preset keeps tensors under 1e5 elements whole, i.e. nearly all of a
    tiny model, which would leave the partitioned code paths untested. (The config twins use the preset.)"""
    from aa_lightning.strategies import zero_config

    config = zero_config(stage=3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


# ------------------------------------------------------------------------------------------------------
# the shipped ZeRO-3 configs and their tiny twins
# ------------------------------------------------------------------------------------------------------


def zero3_shipped_configs() -> list[str]:
    """Names (``dpo_ti2t``, ...) of every ``configs/*.yaml`` whose trainer uses ``deepspeed_stage_3``."""
    import glob

    import yaml

    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        with open(path) as f:
            config = yaml.safe_load(f)
        if str((config.get("trainer") or {}).get("strategy", "")).startswith("deepspeed_stage_3"):
            names.append(os.path.basename(path)[: -len(".yaml")])
    return names


# knobs of a shipped config that change which code runs; the twin takes them over (model paths, sizes, data
# locations and schedules stay the tiny config's own)
MIRRORED_TRAINER_KEYS = ("precision", "gradient_clip_val", "accumulate_grad_batches")
NOT_MIRRORED_MODEL_KEYS = frozenset(
    {
        "model_name_or_path",
        "reward_model_name_or_path",
        "cost_model_name_or_path",
        "critic_model_name_or_path",
        "cost_critic_model_name_or_path",
        "ref_model_name_or_path",
        "optim",
        "generation",
        "reward_functions",
        "cost_functions",
        "sample_log_interval",
        "num_logged_samples",
    }
)
MIRRORED_DATA_KEYS = ("on_bad_row",)
# The tiny media train sets hold 2-6 rows. Under DeepSpeed an epoch with fewer batches than the accumulation
# window never steps (Lightning counts the window per epoch, so it never closes), and max_steps then loops
# forever: accumulation is mirrored capped at 2, and a smaller shipped batch size is taken over.
MAX_TWIN_ACCUMULATION = 2


def twin_overrides(name: str) -> list[str]:
    """Command-line overrides that give ``configs/tiny/<name>.yaml`` the shipped config's code-path knobs."""
    import yaml

    with open(os.path.join(REPO, "configs", f"{name}.yaml")) as f:
        shipped = yaml.safe_load(f)
    with open(os.path.join(REPO, "configs", "tiny", f"{name}.yaml")) as f:
        tiny = yaml.safe_load(f)

    def flag(section: str, key: str, value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        return f"--{section}.{key}={text}"

    args = []
    for key in MIRRORED_TRAINER_KEYS:
        value = shipped["trainer"].get(key)
        if key == "accumulate_grad_batches" and value is not None:
            value = min(int(value), MAX_TWIN_ACCUMULATION)
        if value is not None and tiny["trainer"].get(key) != value:
            args.append(flag("trainer", key, value))
    tiny_model = tiny["model"]["init_args"]
    for key, value in shipped["model"].get("init_args", {}).items():
        if key not in NOT_MIRRORED_MODEL_KEYS and value is not None and tiny_model.get(key) != value:
            args.append(flag("model.init_args", key, value))
    shipped_data, tiny_data = shipped["data"]["init_args"], tiny["data"]["init_args"]
    for key in MIRRORED_DATA_KEYS:
        value = shipped_data.get(key)
        if value is not None and tiny_data.get(key) != value:
            args.append(flag("data.init_args", key, value))
    if shipped_data.get("batch_size", 10**9) < tiny_data.get("batch_size", 1):
        args.append(flag("data.init_args", "batch_size", shipped_data["batch_size"]))
    return args


def column_cells(column: Column) -> list[str]:
    return zero3_shipped_configs() if column.kind == "configs" else list(column.algorithms)


# ------------------------------------------------------------------------------------------------------
# combinations that cannot work: they must be refused at start-up, in one line matching the pattern
# ------------------------------------------------------------------------------------------------------

UNSUPPORTED: dict[tuple[str, str], str] = {
    ("zero3", "sft_skip_nonfinite"): r"on_nonfinite: skip is not supported under DeepSpeed",
}
