"""Every config-dataclass argument of every algorithm, datamodule and callback accepts a plain dict.

A notebook user writes ``SFTModule(optim={"lr": 1e-5})``, as YAML would. The cases are discovered from the
registries (``aa list``'s algorithms and datamodules, the exported callbacks) and the constructors' type hints,
walking ``*args/**kwargs`` forwarding up the class chain, so a new module or a new dataclass argument is
covered without editing this file (a new dataclass needs one sample row in :data:`SAMPLES`, and the test
says so). Nothing loads a model: constructors only store settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

import lightning.pytorch as pl
import pytest

import aa_lightning.algorithms as algorithms
import aa_lightning.callbacks as callbacks
import aa_lightning.data as data
from aa_lightning.algorithms.config import GenerationConfig, LoraConfig, OptimConfig
from aa_lightning.data.sources import DataSpec
from aa_lightning.environments import EnvironmentSpec
from aa_lightning.listing import algorithms as listed_algorithms
from aa_lightning.listing import datamodules as listed_datamodules
from aa_lightning.rewards import RewardSpec

# One non-default value set per config dataclass (so the coerced object is told apart from the defaults).
SAMPLES: dict[type, dict[str, Any]] = {
    OptimConfig: {"lr": 1e-5, "weight_decay": 0.1, "betas": (0.8, 0.9), "warmup_steps": 3},
    LoraConfig: {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
    GenerationConfig: {"max_new_tokens": 7, "do_sample": False, "top_k": 5},
    DataSpec: {"path": "rows.json", "template": "Alpaca", "size": 3},
    RewardSpec: {"name": "response_length", "weight": 0.5},
    EnvironmentSpec: {"name": "tools", "kwargs": {"tools": ["calculator"]}},
}
# Arguments a constructor cannot do without (an RL module needs some reward), by argument name.
REQUIRED: dict[str, Any] = {
    "reward_functions": [RewardSpec(name="format")],
    "cost_functions": [RewardSpec(name="response_length")],
}
BASES = (pl.LightningModule, pl.LightningDataModule, pl.Callback, object)


def registered_classes() -> list[type]:
    found = [getattr(algorithms, name) for name, _ in listed_algorithms()]
    found += [getattr(data, name) for name, _ in listed_datamodules()]
    found += [
        obj
        for name in callbacks.__all__
        if inspect.isclass(obj := getattr(callbacks, name)) and issubclass(obj, pl.Callback)
    ]
    return found


def constructor_parameters(cls: type) -> dict[str, tuple[Any, inspect.Parameter]]:
    """Every named ``__init__`` argument of ``cls`` with its type hint, following ``*args/**kwargs`` up the MRO."""
    params: dict[str, tuple[Any, inspect.Parameter]] = {}
    for klass in cls.__mro__:
        if klass in BASES:
            break
        init = vars(klass).get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        forwards = False
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                forwards = True
            else:
                params.setdefault(p.name, (hints.get(p.name), p))
        if not forwards:
            break
    return params


def config_classes(hint: Any) -> tuple[list[type], bool]:
    """The dataclasses named in a type hint (through ``X | None`` and ``list[X]``), and whether a list is."""
    found: list[type] = []
    is_list = False
    todo = [hint]
    while todo:
        t = todo.pop()
        origin = typing.get_origin(t)
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            found.append(t)
        elif origin in (typing.Union, types.UnionType):
            todo.extend(typing.get_args(t))
        elif origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
            is_list = True
            todo.extend(typing.get_args(t))
    return list(dict.fromkeys(found)), is_list


def cases() -> list[tuple[type, str, type, bool]]:
    out = []
    for cls in registered_classes():
        for name, (hint, _) in constructor_parameters(cls).items():
            classes, is_list = config_classes(hint)
            out.extend((cls, name, config, is_list) for config in classes)
    return out


CASES = cases()


def build(cls: type, **kwargs: Any) -> Any:
    params = constructor_parameters(cls)
    args = {k: v for k, v in REQUIRED.items() if k in params and k not in kwargs}
    missing = [n for n, (_, p) in params.items() if p.default is p.empty and n not in {**args, **kwargs}]
    assert not missing, f"{cls.__name__} requires {missing}: add a value to REQUIRED in this test"
    return cls(**args, **kwargs)


def refusal(cls: type, name: str, config: type, is_list: bool) -> str | None:
    """The TypeError naming ``name`` that a class raises for an inherited argument it does not take (a
    text-to-image datamodule's chat-data settings), given even as its documented type; None when it is taken."""
    instance = config(**SAMPLES[config])
    try:
        build(cls, **{name: [instance] if is_list else instance})
    except TypeError as err:
        if name not in str(err):
            raise
        return str(err)
    return None


def held_configs(obj: Any, config: type, depth: int = 3) -> list[Any]:
    """Instances of ``config`` reachable from ``obj``'s attributes (not its saved hyper-parameters), and any
    raw dict that was kept instead (a dict among them fails the test)."""
    found: list[Any] = []

    def visit(value: Any, level: int) -> None:
        if isinstance(value, config) or (isinstance(value, dict) and set(value) == set(SAMPLES[config])):
            found.append(value)
        elif level and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, level - 1)
        elif level and isinstance(value, dict):
            for item in value.values():
                visit(item, level - 1)
        elif level and type(value).__module__.startswith("aa_lightning") and hasattr(value, "__dict__"):
            for key, item in vars(value).items():
                if not key.startswith("_hparams"):
                    visit(item, level - 1)

    for key, value in vars(obj).items():
        if not key.startswith("_hparams") and key not in ("_modules", "_parameters", "_buffers"):
            visit(value, depth)
    return found


def case_id(case: tuple[type, str, type, bool]) -> str:
    return f"{case[0].__name__}.{case[1]}"


def test_the_discovery_finds_the_known_config_arguments() -> None:
    """Guards the discovery itself: if the type-hint walk broke, the parametrized tests would see nothing."""
    found = {(cls.__name__, name) for cls, name, _, _ in CASES}
    for expected in [
        ("SFTModule", "optim"),
        ("SFTModule", "lora"),
        ("DPOModule", "generation"),
        ("GRPOModule", "generation"),
        ("GRPOModule", "reward_functions"),
        ("SafeRLHFModule", "cost_functions"),
        ("TextToTextDataModule", "train"),
        ("TextImageToTextDataModule", "val"),
        ("TextToImageDataModule", "train"),
    ]:
        assert expected in found, f"{expected} not discovered; found {sorted(found)}"
    assert {config for _, _, config, _ in CASES} <= set(SAMPLES), (
        "add a sample row to SAMPLES for a new config"
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_dict_becomes_the_config_dataclass(case: tuple[type, str, type, bool]) -> None:
    cls, name, config, is_list = case
    sample = SAMPLES[config]
    expected = config(**sample)
    refused = refusal(cls, name, config, is_list)
    if refused is not None:  # the class takes no such argument at all: a dict is refused with the same words
        with pytest.raises(TypeError, match=re.escape(refused)):
            build(cls, **{name: sample})
        return
    for value in ([sample], sample) if is_list else (sample,):
        obj = build(cls, **{name: value})
        held = held_configs(obj, config)
        raw = [h for h in held if isinstance(h, dict)]
        assert not raw, f"{cls.__name__}({name}=...) kept the dict {raw[0]} instead of a {config.__name__}"
        assert expected in held, f"{cls.__name__}({name}={value!r}) holds no {expected}; it holds {held}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_an_unknown_key_names_the_section_and_the_key(case: tuple[type, str, type, bool]) -> None:
    cls, name, config, is_list = case
    if refusal(cls, name, config, is_list) is not None:
        pytest.skip("not an argument of this class (see test_a_dict_becomes_the_config_dataclass)")
    bad = {**SAMPLES[config], "no_such_field": 1}
    with pytest.raises(
        ValueError, match=rf"{name}(\[0\])?: unknown field\(s\) 'no_such_field'; {config.__name__}"
    ):
        build(cls, **{name: [bad] if is_list else bad})


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_value_of_the_wrong_type_is_refused_naming_the_section(case: tuple[type, str, type, bool]) -> None:
    cls, name, config, is_list = case
    if refusal(cls, name, config, is_list) is not None:
        pytest.skip("not an argument of this class (see test_a_dict_becomes_the_config_dataclass)")
    with pytest.raises(ValueError, match=rf"^{name}(\[0\])?: expected a"):
        build(cls, **{name: 3})


def test_the_optimizer_built_from_a_dict_uses_its_values() -> None:
    """The issue's notebook line end to end: ``optim={...}`` reaches AdamW and its schedule (no trainer needed)."""
    module = algorithms.SFTModule(
        model_name_or_path="tiny-llama", optim={"lr": 2e-3, "weight_decay": 0.25, "warmup_steps": 0}
    )
    module.configure_model()
    out = module.configure_optimizers()
    groups = out["optimizer"].param_groups
    assert {g["initial_lr"] for g in groups} == {2e-3}
    assert {g["lr"] for g in groups} == {2e-3}  # step 0 of the cosine after no warm-up: the peak
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.25]  # norms and biases decay-free
