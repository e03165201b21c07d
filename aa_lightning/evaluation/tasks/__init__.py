"""The built-in evaluation tasks (importing this package registers them)."""

from aa_lightning.evaluation.tasks.image_generation import ClipScoreTask
from aa_lightning.evaluation.tasks.lm_eval_harness import LMEvalHarness
from aa_lightning.evaluation.tasks.maths import GSM8KTask, MathTask
from aa_lightning.evaluation.tasks.multiple_choice import GeneratedChoice, LogLikelihoodChoice
from aa_lightning.evaluation.tasks.preference import PreferenceAccuracy
from aa_lightning.evaluation.tasks.safety import SafetyTask
from aa_lightning.evaluation.tasks.vqa import VQAExactMatch
from aa_lightning.evaluation.tasks.win_rate import WinRate

__all__ = [
    "ClipScoreTask",
    "GSM8KTask",
    "GeneratedChoice",
    "LMEvalHarness",
    "LogLikelihoodChoice",
    "MathTask",
    "PreferenceAccuracy",
    "SafetyTask",
    "VQAExactMatch",
    "WinRate",
]
