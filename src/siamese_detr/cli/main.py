"""The ``siamese-detr`` console script: one parser, one sub-command module per verb.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``(args) -> int``. User mistakes raise :class:`UserError` (or
``ConfigError``) and are printed as one line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from siamese_detr.errors import (  # noqa: F401  (UserError: old path)
    EXIT_STOPPED,
    ConfigError,
    RunStopped,
    UserError,
)


def build_parser() -> argparse.ArgumentParser:
    from siamese_detr import __version__

    parser = argparse.ArgumentParser(
        prog="siamese-detr",
        description="Self-supervised pretraining (Siamese DETR, UP-DETR, DETReg) and "
        "fine-tuning of DETR-family detectors.",
    )
    parser.add_argument("--version", action="version", version=f"siamese-detr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in ("proposals", "pretrain", "finetune", "evaluate", "predict", "convert", "export",
                 "config", "demo", "voc2coco"):
        try:
            module = importlib.import_module(f"siamese_detr.cli.{name}")
        except ModuleNotFoundError as exc:  # sub-command not built yet
            if exc.name == f"siamese_detr.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may be interleaved with options (argparse only collects the first run)
    leftovers = [a for a in extra if a.startswith("-") or "=" not in a]
    if leftovers or (extra and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # prints the usual usage error and exits 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as exc:
        print(f"siamese-detr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:  # a signal or too many non-finite losses; checkpoint saved
        from siamese_detr.cli.common import resume_command

        print(f"siamese-detr {args.command}: {exc}; resume with: {resume_command(argv)}",
              file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_STOPPED))
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print(f"siamese-detr {args.command}: interrupted; {_interrupted_hint(args, argv)}",
              file=sys.stderr)
        return 130


def _interrupted_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """Where an interrupted training run can be resumed from (its last checkpoint)."""
    out = getattr(args, "out", None)
    if args.command not in ("pretrain", "finetune"):
        return "finished work is kept; re-run to continue"
    from pathlib import Path

    from siamese_detr.cli.common import resume_command

    if out is None or not (Path(out) / "last.pt").is_file():
        return "no checkpoint was written yet; re-run the command to start again"
    return (f"the last periodic checkpoint {Path(out) / 'last.pt'} is kept; resume with: "
            f"{resume_command(argv)}")


if __name__ == "__main__":
    sys.exit(main())
