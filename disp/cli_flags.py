"""Command-line flags generated from the settings dataclasses, with their help texts and defaults."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields, is_dataclass

from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig

# (section, dataclass, flag renames for names shared between sections)
SECTIONS = [
    ("sampler", SamplerConfig, {}),
    ("saliency", SaliencyConfig, {"batch_size": "saliency-batch-size", "seed": "saliency-seed"}),
    ("purify", PurifyConfig, {"batch_size": "purify-batch-size", "seed": "purify-seed",
                              "question": "purify-question"}),
    ("finetune", FinetuneConfig, {}),
]


def field_help(f, default=MISSING) -> str:
    """A dataclass field's help text for argparse, with its default appended when given; '%' is escaped,
    since argparse formats help strings with %."""
    text = f.metadata.get("help", "")
    if default is not MISSING:
        text = f"{text} (default: {'unset' if default is None else default})"
    return text.replace("%", "%%")


def _metavar(f) -> str | None:
    """The value's name in usage lines: the choices where there are some, else the field's name."""
    return None if "choices" in f.metadata else f.name.upper()


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


def add_dataclass_flags(parser: argparse.ArgumentParser, section: str, cls, renames: dict[str, str],
                        group=None, prefix: str = "") -> None:
    """One flag per field of `cls`; a nested settings dataclass that is not a section of its own (such as
    `SamplerConfig.lavida`) gets its fields' flags in the same group, with dests `section__field__sub`."""
    group = group or parser.add_argument_group(f"{section} settings")
    sections = {c for _, c, _ in SECTIONS}
    for f in fields(cls):
        default = _default(f)
        if is_dataclass(default):
            if type(default) not in sections:
                add_dataclass_flags(parser, section, type(default), renames, group, f"{prefix}{f.name}__")
            continue
        flag = "--" + renames.get(f.name, f.name.replace("_", "-"))
        dest = f"{section}__{prefix}{f.name}"
        help_text = field_help(f, default)
        if isinstance(default, bool) or (default is None and "bool" in str(f.type)):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = type(default) if default is not None else (float if "float" in str(f.type) else int)
            group.add_argument(flag, dest=dest, type=kind, default=default, help=help_text,
                               choices=f.metadata.get("choices"), metavar=_metavar(f))


def add_defense_flags(parser: argparse.ArgumentParser, *, sections=("sampler", "saliency", "purify", "finetune"),
                      defense: bool = True) -> None:
    """Flags for every setting of the given sections (and the defense choice), published defaults."""
    if defense:
        for f in fields(DefenseConfig):
            default = _default(f)
            if is_dataclass(default):
                continue
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f"defense__{f.name}", type=type(default),
                                default=default, help=field_help(f, default), choices=f.metadata.get("choices"),
                                metavar=_metavar(f))
    for section, cls, renames in SECTIONS:
        if section in sections:
            add_dataclass_flags(parser, section, cls, renames)


def section_kwargs(args: argparse.Namespace, section: str) -> dict:
    """The parsed flags of a section as keyword arguments, nested settings as dicts (`lavida={...}`)."""
    out: dict = {}
    for key, value in vars(args).items():
        if key.startswith(section + "__"):
            *path, name = key.split("__")[1:]
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[name] = value
    return out


def defense_config(args: argparse.Namespace) -> DefenseConfig:
    """Build (and so validate) a DefenseConfig from parsed flags."""
    sampler = SamplerConfig(**section_kwargs(args, "sampler"))
    return DefenseConfig(
        **section_kwargs(args, "defense"),
        saliency=SaliencyConfig(**section_kwargs(args, "saliency")),
        purify=PurifyConfig(**section_kwargs(args, "purify"), sampler=sampler),
        finetune=FinetuneConfig(**section_kwargs(args, "finetune")),
    )
