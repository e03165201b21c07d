"""``aa list``: every name a config can use, one line each, read from the registries themselves.

Why: ``aa fit --help`` documents the Trainer, not what this package offers; a new user needs the names of the
algorithms, datamodules, templates, rewards and strategies, and where each goes in a config. Nothing here
is a hand-kept list: a newly registered template, reward or strategy shows up by itself. A new registry
joins :data:`SECTIONS` with one function returning ``(name, description)`` pairs.

aa list                 # everything
aa list rewards         # one section (any unambiguous prefix: aa list temp)
"""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

__all__ = ["SECTIONS", "Section", "first_line", "help_parser_kwargs", "main", "sections"]

Rows = list[tuple[str, str]]


def first_line(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring as one line, without reST markup (``Foo``, not ````Foo````)."""
    doc = (inspect.getdoc(obj) or "").strip()
    line = " ".join(doc.split("\n\n")[0].split())
    line = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], line)
    return line.replace("``", "")


def _exported_subclasses(module: Any, base: type, skip: Iterable[str] = ()) -> Rows:
    rows = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) and issubclass(obj, base) and name not in set(skip):
            rows.append((name, first_line(obj)))
    return sorted(rows)


def algorithms() -> Rows:
    import lightning.pytorch as pl

    import aa_lightning.algorithms as module

    return _exported_subclasses(module, pl.LightningModule, skip=("AlignModule",))  # the base, no algorithm


def datamodules() -> Rows:
    import lightning.pytorch as pl

    import aa_lightning.data as module

    return _exported_subclasses(module, pl.LightningDataModule)


def templates() -> Rows:
    from aa_lightning.data.formatters import registry

    return [(name, first_line(cls)) for name, cls in registry._TEMPLATES.items()]


def rewards() -> Rows:
    from aa_lightning.rewards import available_rewards, get_reward

    return [(name, first_line(get_reward(name).fn)) for name in available_rewards()]


def environments() -> Rows:
    from aa_lightning.environments.base import available_environments, environment_class

    return [(name, first_line(environment_class(name))) for name in available_environments()]


def tools() -> Rows:
    from aa_lightning.environments import available_tools, get_tool

    return [(name, get_tool(name).description) for name in available_tools()]


def strategies() -> Rows:
    from lightning.pytorch.strategies import StrategyRegistry

    import aa_lightning.strategies  # noqa: F401  (registers deepspeed_cpu*)

    rows = []
    for name in StrategyRegistry.available_strategies():
        entry = StrategyRegistry[name]
        rows.append((name, entry.get("description") or first_line(entry["strategy"])))
    return sorted(rows)


def model_aliases() -> Rows:
    from aa_lightning.models.embedded import EMBEDDED_MODELS
    from aa_lightning.testing.tiny_builders import TINY_BUILDERS

    rows = [(name, spec.description or spec.architecture) for name, spec in EMBEDDED_MODELS.items()]
    rows += [(name, "(random, for tests) " + first_line(build)) for name, build in TINY_BUILDERS.items()]
    return rows


def model_types() -> Rows:
    from aa_lightning.models.registry import MODEL_REGISTRY

    return [(name, f"{cls.__module__}.{cls.__qualname__}") for name, cls in MODEL_REGISTRY.items()]


def eval_tasks() -> Rows:
    from aa_lightning.evaluation.registry import TASKS, available_tasks

    return [(name, first_line(TASKS[name])) for name in available_tasks()]


def rollout_engines() -> Rows:
    from aa_lightning.algorithms.rl.rollout_engines.registry import engine_class, rollout_engine_names

    return [(name, first_line(engine_class(name))) for name in rollout_engine_names()]


class Section:
    """One registry as ``aa list`` shows it: a title, where its names go in a config, and its rows."""

    def __init__(self, name: str, usage: str, rows: Callable[[], Rows]) -> None:
        self.name, self.usage, self.rows = name, usage, rows


SECTIONS: list[Section] = [
    Section(
        "algorithms", "model.class_path (`--model NAME`); arguments: `aa fit --model.help NAME`", algorithms
    ),
    Section(
        "datamodules", "data.class_path (`--data NAME`); arguments: `aa fit --data.help NAME`", datamodules
    ),
    Section("templates", "data.init_args.train.template (formatters, @register_template)", templates),
    Section(
        "rewards", "model.init_args.reward_functions: [{name: NAME, weight: W}] (@register_reward)", rewards
    ),
    Section(
        "environments",
        "model.init_args.environment: NAME or {name: NAME, kwargs: {...}} (@register_environment)",
        environments,
    ),
    Section("tools", "environment tools kwargs and data.init_args.tools (@register_tool)", tools),
    Section("strategies", "trainer.strategy (Lightning's and aa_lightning.strategies)", strategies),
    Section(
        "models",
        "model.init_args.model_name_or_path (aliases; any model folder or hub name works too)",
        model_aliases,
    ),
    Section("model-types", "classes registered per config.model_type (@register_model)", model_types),
    Section("rollout-engines", "model.init_args.rollout_engine (@register_rollout_engine)", rollout_engines),
    Section("eval-tasks", "`aa eval` config tasks: [{task: NAME, data: ...}] (@register_task)", eval_tasks),
]


def sections(wanted: str | None = None) -> list[Section]:
    """All sections, or the one whose name starts with ``wanted`` (an unknown or ambiguous prefix raises)."""
    if not wanted:
        return list(SECTIONS)
    matches = [s for s in SECTIONS if s.name == wanted] or [s for s in SECTIONS if s.name.startswith(wanted)]
    if len(matches) != 1:
        names = ", ".join(s.name for s in SECTIONS)
        raise ValueError(f"{'ambiguous' if matches else 'unknown'} section {wanted!r}; sections: {names}")
    return matches


MAX_DESCRIPTION = 110  # characters of a description shown without --full: one line each


def render(chosen: list[Section], out: TextIO, width: int, full: bool = False) -> None:
    for index, section in enumerate(chosen):
        rows = section.rows()
        if index:
            print(file=out)
        print(f"{section.name} ({len(rows)}): {section.usage}", file=out)
        pad = max((len(name) for name, _ in rows), default=0)
        for name, description in rows:
            if not full and len(description) > MAX_DESCRIPTION:
                description = description[: MAX_DESCRIPTION - 3].rstrip(" ,;:") + "..."
            line = f"  {name:<{pad}}  {description}".rstrip()
            if width and len(line) > width:
                line = line[: width - 3].rstrip() + "..."
            print(line, file=out)


CLASS_HELP = (
    "The arguments of an algorithm or a datamodule are listed by its own help: `aa {cmd} --model.help SFTModule`, "
    "`aa {cmd} --model.help GRPOModule`, `aa {cmd} --data.help TextToTextDataModule` (short class names or "
    "full class paths). `aa list` prints every algorithm, datamodule, template, reward and strategy by name; "
    "`aa chat MODEL` talks to a trained model."
)
_POINTER = " An algorithm's own arguments: `aa {cmd} --model.help SFTModule`; every name: `aa list`."
SUBCOMMAND_HELP = {
    "fit": "Train (`aa fit --config configs/tiny/sft_t2t.yaml`)." + _POINTER,
    "validate": "Evaluate on the validation split." + _POINTER,
    "test": "Evaluate on the test split." + _POINTER,
    "predict": "Generate answers for the predict split." + _POINTER,
}


def help_parser_kwargs() -> dict[str, dict[str, str] | str]:
    """LightningCLI ``parser_kwargs`` that put the way to class arguments and to ``aa list`` into the help
    (a Trainer-only ``aa fit --help`` of hundreds of lines otherwise never names an algorithm argument)."""
    kwargs: dict[str, dict[str, str] | str] = {
        cmd: {"description": text.format(cmd=cmd), "epilog": CLASS_HELP.format(cmd=cmd)}
        for cmd, text in SUBCOMMAND_HELP.items()
    }
    kwargs["epilog"] = CLASS_HELP.format(cmd="fit")
    return kwargs


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aa list``."""
    parser = argparse.ArgumentParser(prog="aa list", description=__doc__.split("\n\n")[0])
    parser.add_argument("section", nargs="?", help=", ".join(s.name for s in SECTIONS))
    parser.add_argument(
        "--full", action="store_true", help="whole descriptions, lines not cut to the terminal"
    )
    args = parser.parse_args(argv)
    try:
        chosen = sections(args.section)
    except ValueError as err:
        parser.error(str(err))
    width = 0 if args.full or not sys.stdout.isatty() else shutil.get_terminal_size().columns
    render(chosen, sys.stdout, width, full=args.full)
