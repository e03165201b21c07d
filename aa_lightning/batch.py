"""Batch keys written by the data layer and read by the algorithms (so neither imports the other).

``batch["extra"][STEP_LABEL_TOKENS]`` and, in preference batches, ``batch["extra"][STEP_CHOSEN_LABEL_TOKENS]``
are ``(B,)`` int64 tensors whose rows all hold one number: how many labelled target tokens
(``labels[1:] != -100``, the positions a causal-LM loss scores) this rank's whole accumulation window
holds, the window being the micro-batches of the optimizer step this batch belongs to. STEP_LABEL_TOKENS
counts every row (supervised: all; preference: chosen and rejected), STEP_CHOSEN_LABEL_TOKENS the chosen
rows only. With them a token-mean loss can divide by the token count of the whole step from the step's
first micro-batch on (see :mod:`aa_lightning.algorithms.token_mean`). The training loader of the
datamodules adds them when it runs under a Trainer.
"""

STEP_LABEL_TOKENS = "step_label_tokens"
STEP_CHOSEN_LABEL_TOKENS = "step_chosen_label_tokens"
