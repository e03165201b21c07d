"""Model classes first imported while ZeRO-3's ``zero.Init`` is open keep the ``__init__`` their decorators gave them.

DeepSpeed wraps the ``__init__`` of classes created inside the context before their class decorators run,
and restores that undecorated ``__init__`` on exit; transformers >= 5.25 decorates attention classes that way
(``kernels``' ``use_kernelized_func``), so models built after the context (exports, later loads) broke.
``load_pretrained_models`` imports the model's code with the context paused (``models/zero3_context.py``).
The behavioural test uses a stand-in package with such a decorator, so it does not depend on ``kernels``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from launch_env import DIST_ENV
from transformers import Qwen2Config, Qwen2VLConfig

from aa_lightning.models.zero3_context import modeling_modules

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIGURATION = """
from transformers import PretrainedConfig

class StandInConfig(PretrainedConfig):
    model_type = "stand_in"
"""

MODELING = """
from torch import nn

def sets_up_in_init(cls):
    # like kernels' use_kernelized_func: replaces __init__ after the class exists
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.__dict__["set_up"] = True

    cls.__init__ = __init__
    return cls

@sets_up_in_init
class StandInLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
"""

SCRIPT = """
import importlib, os, sys
import aa_lightning.strategies  # DS_ACCELERATOR and TORCH_EXTENSIONS_DIR before DeepSpeed's first import
import deepspeed
from aa_lightning.models.zero3_context import import_model_code

deepspeed.init_distributed("gloo")
ds_config = {"zero_optimization": {"stage": 3}, "train_batch_size": 1}
for package in ("stand_in_lazy", "stand_in_early"):
    config = importlib.import_module(f"{package}.configuration_stand_in").StandInConfig()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        if package == "stand_in_early":
            import_model_code(config)
        layer_class = importlib.import_module(f"{package}.modeling_stand_in").StandInLayer
        layer_class()
    print(package, "built after the context is set up:", "set_up" in vars(layer_class()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_modeling_modules_of_a_config_and_its_towers() -> None:
    assert modeling_modules(Qwen2Config()) == ["transformers.models.qwen2.modeling_qwen2"]
    # the composite config and its text/vision sub-configs live in one modeling module: named once
    assert modeling_modules(Qwen2VLConfig()) == ["transformers.models.qwen2_vl.modeling_qwen2_vl"]


def test_decorated_init_survives_a_class_first_imported_under_zero_init(tmp_path) -> None:
    for package in ("stand_in_lazy", "stand_in_early"):
        folder = tmp_path / package
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "configuration_stand_in.py").write_text(textwrap.dedent(CONFIGURATION))
        (folder / "modeling_stand_in.py").write_text(textwrap.dedent(MODELING))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # DeepSpeed's own behaviour, which the fix works around: imported inside, the decorated __init__ is lost
    assert "stand_in_lazy built after the context is set up: False" in done.stdout, done.stdout
    # imported through import_model_code (what load_pretrained_models does), the class keeps it
    assert "stand_in_early built after the context is set up: True" in done.stdout, done.stdout
