"""Command-line flags built from the settings dataclasses (:class:`reta_fast.stages.DistillConfig`,
:class:`reta_fast.stages.EvalConfig`): every default and help text lives in one place, the field (see
``reta_fast.stages.config._opt``), and the flags are read back into the dataclass by :func:`config_from`."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Dict, Optional

__all__ = ["add_config_flags", "config_from"]

_SCALARS = {"int": int, "float": float, "str": str}
GROUP_TITLES = {"engine": "recover engine (changes images at rounding level; recorded in run.json)"}


def _scalar(annotation: str, default):
    """The element type of a field from its annotation (a string under postponed evaluation)."""
    if default is not None and not isinstance(default, (list, tuple)):
        return type(default)
    inner = annotation.replace("Optional[", "").replace("Sequence[", "").replace("]", "")
    return _SCALARS.get(inner.strip(), str)


def _default(f, overrides: Dict[str, object]):
    if f.name in overrides:
        return overrides[f.name]
    return f.default if f.default is not MISSING else f.default_factory()


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, prefix: str = "",
                     overrides: Optional[Dict[str, object]] = None) -> None:
    """Add a flag for every field of ``cls`` that is on the command line, in argument groups (``title`` for
    the main one). ``prefix`` keeps two dataclasses' destinations apart (``args.<prefix><field>``);
    ``overrides`` replaces defaults (``reta demo``'s)."""
    overrides = overrides or {}
    groups = {}
    for f in fields(cls):
        md = dict(f.metadata)
        if not md or md.get("cli") is False or md.get("group") == "common":
            continue
        name = md.get("group", "main")
        if name not in groups:
            groups[name] = parser.add_argument_group(title if name == "main" else GROUP_TITLES.get(name, name))
        g = groups[name]
        dest = prefix + f.name
        default = _default(f, overrides)
        flag = "--" + md.get("flag", f.name.replace("_", "-"))
        help_text = md["help"]
        negation = md.get("negation")
        if isinstance(default, bool) and negation:  # a switch that turns a default-on setting off
            g.add_argument("--" + negation[0], dest=dest, action="store_const", const=negation[1], default=default,
                           help=help_text)
            continue
        if isinstance(default, bool):
            g.add_argument(flag, dest=dest, action="store_true", default=default, help=help_text)
            continue
        shown = f" (default: {default})" if default is not None else ""
        if md.get("kind") == "ints":
            g.add_argument(flag, dest=dest, default=default, help=help_text + shown,
                           type=lambda v: [int(r) for r in v.split(",")])
        elif md.get("kind") == "many":
            g.add_argument(flag, dest=dest, default=list(default), nargs="+", help=help_text + shown,
                           type=_scalar(f.type, default[0] if default else None))
        elif "const" in md:
            g.add_argument(flag, dest=dest, default=default, nargs="?", const=md["const"], choices=md.get("choices"),
                           help=help_text)
        else:
            g.add_argument(flag, dest=dest, default=default, type=_scalar(f.type, default), choices=md.get("choices"),
                           help=help_text + shown)
        if negation:  # a value field with a switch for one value (--no-bn: r_bn = 0)
            g.add_argument("--" + negation[0], dest=dest, action="store_const", const=negation[1],
                           help=f"{flag} {negation[1]}")


def config_from(cls, args, prefix: str = ""):
    """The dataclass ``cls`` from parsed flags (fields without a flag keep their defaults)."""
    kw = {}
    for f in fields(cls):
        if hasattr(args, prefix + f.name):
            v = getattr(args, prefix + f.name)
            kw[f.name] = tuple(v) if isinstance(f.default, tuple) and isinstance(v, list) else v
    return cls(**kw)
