"""``reidkit config``: print the fully resolved config, as it will run.

    reidkit config -c CONFIG [key=value ...]      # YAML with _base_ files, presets, overrides
    reidkit config --methods                      # the registered methods and their options

The printed YAML is what ``reidkit train`` writes to ``<output_dir>/config.yaml``: every
inherited file merged, the method's presets filled in where the config does not set a
value itself, the method's own options section (``model.<method>``) with its defaults,
and the ``key=value`` overrides applied. Errors (unknown keys, bad values) are reported
as for ``train``.
"""

from __future__ import annotations

import argparse

import yaml

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def _methods_table() -> str:
    from reidkit.methods import all_method_specs

    rows = []
    for spec in all_method_specs():
        section = f"model.{spec.section}" if spec.section else "-"
        presets = ", ".join(
            f"{sec}.{k}={v}" for sec, fields in spec.presets.items() for k, v in fields.items()
        )
        rows.append(
            (spec.name, section, ", ".join(spec.cls.feature_names), presets or "-", spec.summary)
        )
    head = ("method", "options", "test.feature", "presets", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:4], widths))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from reidkit.config import config_to_dict

    if args.methods:
        print(_methods_table())
        return 0
    if not args.config:
        raise ValueError("give -c CONFIG (or --methods)")
    cfg = _common.load_config_from_args(args)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "config", help="print the resolved config (presets, overrides applied)", doc=__doc__
    )
    p.add_argument("-c", "--config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--methods", action="store_true", help="list the registered methods")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
