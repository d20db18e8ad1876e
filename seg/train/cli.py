"""LightningCLI for fit / validate / test / predict, with the project's links and trainer defaults."""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from jsonargparse.typing import import_object
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from seg.data import DatasetSpec, SegmentationDataModule, as_spec
from seg.data.safety import UnsafeOutputError
from seg.model.backbones._weights import CheckpointMismatchError
from seg.train.callbacks.effective_batch import EffectiveBatch
from seg.train.task import SegmentationTask

__all__ = [
    "SegmentationArgumentParser", "SegmentationCLI", "cli_main", "main", "spec_num_classes", "unknown_key_hint",
]

# refusals whose message says everything a user needs: printed as one line, not as a traceback
REFUSALS = (UnsafeOutputError, CheckpointMismatchError)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULTS_FILE = Path(__file__).with_name("trainer_defaults.yaml")  # loggers and callbacks of every run

# How jsonargparse reports a key it does not know, from a config file, a class's init_args or the command line.
_UNKNOWN_KEY = (
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"class_path '(?P<cls>[\w.]+)':\s*Option '(?P<key>[\w.]+)' is not accepted"),
    re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"),
    re.compile(r"unrecognized arguments: --(?P<key>[\w.]+)"),
)


def _option_names(parser: ArgumentParser) -> set[str]:
    """Dotted option names of a parser and of its subcommands' parsers (without the subcommand)."""
    names = set()
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and choices and all(isinstance(p, ArgumentParser) for p in choices.values()):
            for sub in choices.values():
                names |= _option_names(sub)
        elif action.dest not in ("help", "config", "print_config"):
            names.add(action.dest)
    return names


def unknown_key_hint(parser: ArgumentParser, message: str) -> str:
    """For an unknown-key error: the valid options at that level and the closest one ("" for other errors)."""
    match = next((m for m in (p.search(message) for p in _UNKNOWN_KEY) if m), None)
    if match is None:
        return ""
    found = match.groupdict()
    if found.get("cls"):
        group, bad = found["cls"], found["key"]
        params = inspect.signature(import_object(group)).parameters.values()
        valid = sorted(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    else:
        parts = (f"{found['group']}.{found['key']}" if found.get("group") else found["key"]).split(".")
        names = _option_names(parser)
        depth = len(parts) - 1  # the deepest known group holding the bad key
        while depth and not any(n.startswith(".".join(parts[:depth]) + ".") for n in names):
            depth -= 1
        group, bad = ".".join(parts[:depth]), parts[depth]
        prefix = f"{group}." if group else ""
        valid = sorted({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})
    if not valid:
        return ""
    close = difflib.get_close_matches(bad, valid, n=1)
    where = f" for '{group}'" if group else ""
    return f"\n  valid options{where}: {', '.join(valid)}" + (f"\n  did you mean '{close[0]}'?" if close else "")


def spec_num_classes(value: Any) -> int:
    """The class count of a parsed ``data.spec``: a name, or a spec's fields as a namespace."""
    if not isinstance(value, str | DatasetSpec):
        fields = value.init_args if "init_args" in value else value  # parsed with or without its class_path
        value = fields.as_dict()
    return as_spec(value).num_classes


class SegmentationArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose unknown-key errors list the valid options and the closest match."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if "valid options for" not in message:
            message += unknown_key_hint(getattr(ex, "subcommand_parser", None) or self, message)
        super().error(message, ex)


class SegmentationCLI(LightningCLI):
    """States each fact once: the data module's spec feeds the task, and its class count the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.spec", "model.spec")
        parser.link_arguments("data.spec", "model.model.init_args.num_classes", compute_fn=spec_num_classes)
        # always-present callbacks, configured by top-level keys so an experiment sets one value without
        # restating the callback list: `checkpoint.dirpath`, `effective_batch.expected`
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EffectiveBatch, "effective_batch")

    def before_instantiate_classes(self) -> None:
        """``--model.weights`` replaces the recipe's ImageNet ``encoder_checkpoint``: that file is not read."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model = config.get("model") if config is not None else None
        if model is not None and model.get("weights") is not None and "init_args" in model.get("model", {}):
            model.model.init_args.encoder_checkpoint = None


def cli_main(args: list[str] | None = None, run: bool = True) -> SegmentationCLI:
    """Entry point of ``python cli.py``; ``args`` lets tests drive it in-process."""
    return SegmentationCLI(
        SegmentationTask,
        SegmentationDataModule,
        args=args,
        parser_class=SegmentationArgumentParser,
        run=run,
        parser_kwargs={cmd: {"default_config_files": [str(DEFAULTS_FILE)]} for cmd in SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(args: list[str] | None = None) -> None:
    """``python cli.py``: :func:`cli_main`, with a refusal (an output folder inside the inputs, a checkpoint
    that does not fit the model) ending the process with its message and exit status 1 instead of a traceback."""
    try:
        cli_main(args)
    except REFUSALS as err:
        raise SystemExit(f"error: {err}") from None
