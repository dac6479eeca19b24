"""``siamese-detr config``: list presets, show a resolved config, diff two presets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list / show / diff configuration presets")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s.add_parser("list", help="list preset names")
    show = s.add_parser("show", help="print a preset (with overrides) as YAML")
    show.add_argument("preset")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d = s.add_parser("diff", help="keys that differ between two presets")
    d.add_argument("a")
    d.add_argument("b")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from siamese_detr.configio import apply_overrides, diff, dump_yaml
    from siamese_detr.presets import PRESETS, get_preset

    match args.action:
        case "list":
            for name in PRESETS:
                print(name)
        case "show":
            print(dump_yaml(apply_overrides(get_preset(args.preset), args.overrides)), end="")
        case "diff":
            for key, a, b in diff(get_preset(args.a), get_preset(args.b)):
                print(f"{key}: {a!r} -> {b!r}")
    return 0
