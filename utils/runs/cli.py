"""Small command-line helpers shared by the runners (lengths like "4K", --rope-scaling, a help formatter, one-line
user errors) and the mapping of flags onto SparseAttentionConfig (add_config_args, config_from_args)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

from utils.config import SparseAttentionConfig, config_field_names


def parse_length(text: str) -> int:
    """'4096', '4K' or '4k' -> 4096 tokens (an argparse `type=`)."""
    text = text.strip()
    try:
        value = float(text[:-1]) * 1024 if text[-1:] in "kK" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096 or 4K)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a length must be a positive whole number of tokens, got {text!r}")
    return int(value)


def rope_scaling_arg(text: str):
    """'yarn:4' -> RopeScaling (an argparse `type=`); 'none' -> None."""
    from utils.models.rope_scaling import parse_rope_scaling

    try:
        return parse_rope_scaling(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_rope_scaling_arg(parser: argparse.ArgumentParser) -> None:
    """The one definition of --rope-scaling (every runner that loads a model for long inputs)."""
    parser.add_argument("--rope-scaling", type=rope_scaling_arg, default=None, metavar="KIND:FACTOR",
                        help="extend the model's context with RoPE scaling, e.g. yarn:4 (Qwen2.5: 32K -> 128K "
                             "positions; utils/models/rope_scaling.py); recorded in every result, and its results go to "
                             "their own folder (<model>_yarn4)")


def results_folder_name(model: str, rope_scaling=None) -> str:
    """Name of a model's results folder: the model's name, plus '_yarn4' etc. with --rope-scaling, so that scaled
    runs never resume into (or mix with) unscaled ones."""
    from utils.models.rope_scaling import parse_rope_scaling

    name = Path(str(model).rstrip("/")).name
    scaling = parse_rope_scaling(rope_scaling)
    return f"{name}_{scaling.label}" if scaling is not None else name


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


@contextlib.contextmanager
def user_errors():
    """Bad input (a ValueError or FileNotFoundError whose message names the fix) ends the run with one line,
    `error: ...`, instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def sweep_configs(args: argparse.Namespace) -> list:
    """One SparseAttentionConfig per requested run: --methods (else --method) x --densities (else --density), dense
    once whatever the density, in the order given. Raises ValueError naming the choices for an unknown method."""
    from utils.methods import method_names

    methods = args.methods or [args.method]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose one of: {', '.join(method_names())}")
    configs = []
    for method in dict.fromkeys(methods):
        if method == "dense":
            configs.append(config_from_args(args, method="dense", density=None, budget=None, min_budget=0))
            continue
        for density in dict.fromkeys(args.densities or [args.density]):
            configs.append(config_from_args(args, method=method, density=density))
    return configs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per config field (`query_chunk` -> `--query-chunk`), defaults from the dataclass."""
    group = parser.add_argument_group("sparse attention (utils/config.py)")
    defaults = SparseAttentionConfig()
    for f in dataclasses.fields(SparseAttentionConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        if f.type in ("bool",) or isinstance(default, bool):
            group.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction)
        elif f.name == "dense_layers":
            group.add_argument(_flag(f.name), type=int, nargs="*", default=list(default))
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
            if kind is None:  # "int | None" and friends
                kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            group.add_argument(_flag(f.name), type=kind, default=default)


def config_from_args(args: argparse.Namespace, **overrides) -> SparseAttentionConfig:
    """Build the config from parsed flags; `overrides` win (e.g. method=... per sweep entry)."""
    values = {name: getattr(args, name) for name in config_field_names() if hasattr(args, name)}
    values.update(overrides)
    if "dense_layers" in values and values["dense_layers"] is not None:
        values["dense_layers"] = tuple(values["dense_layers"])
    return SparseAttentionConfig(**values)


__all__ = ["add_config_args", "config_from_args", "sweep_configs", "parse_length", "rope_scaling_arg", "add_rope_scaling_arg", "results_folder_name",
           "HelpFormatter", "user_errors"]
