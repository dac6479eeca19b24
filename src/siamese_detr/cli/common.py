"""Shared CLI plumbing: preset + YAML + ``key.sub=value`` overrides -> a validated RunConfig."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from siamese_detr.config import RunConfig
from siamese_detr.configio import apply_overrides, load_yaml
from siamese_detr.errors import ConfigError, UserError
from siamese_detr.presets import get_preset


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"named recipe (default: {default_preset}; list: "
                             "`siamese-detr config list`)")
    parser.add_argument("--config", default=None,
                        help="YAML file with (a subset of) config keys, applied on the preset")
    parser.add_argument("--out", default=None, help="run folder (sets output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as optim.lr=2e-4 model.num_queries=300")


def config_from_args(args: argparse.Namespace, task: str) -> RunConfig:
    cfg = get_preset(args.preset)
    if args.config:
        cfg = load_yaml(args.config, base=cfg)
    cfg = apply_overrides(cfg, args.overrides)
    if getattr(args, "out", None):
        cfg = replace(cfg, output_dir=args.out)
    if cfg.task != task:
        raise ConfigError(f"preset '{args.preset}' is a {cfg.task} recipe; use "
                          f"`siamese-detr {cfg.task}` or a {task} preset")
    return cfg


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue exactly from a checkpoint (default: OUT/last.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again from step 0 in a run folder that holds a previous "
                             "run (its checkpoints and metrics are removed)")


#: what a training run leaves in its folder: a folder holding any of these is a run
RUN_OUTPUTS = ("last.pt", "step_*.pt", "metrics.jsonl", "final_metrics.json")


def check_run_folder(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over a previous one (silently losing its checkpoints)."""
    if resume:
        return
    found = sorted({p.name for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)})
    if not found:
        return
    if overwrite:
        from siamese_detr.engine.env import world_from_env

        if world_from_env()[0] != 0:
            return
        for name in found:
            (run_dir / name).unlink(missing_ok=True)
        return
    raise UserError(f"run folder {run_dir} already holds a run ({', '.join(found[:4])}); add "
                    "--resume to continue it, --overwrite to start again from step 0, or "
                    "choose another --out")


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run ``argv`` started (``--resume`` added once)."""
    import shlex
    import sys

    prog = ["siamese-detr"]
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        prog = [Path(sys.executable).name, "-m", "siamese_detr"]
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    return shlex.join([*prog, *args])


def run_training(cfg: RunConfig, resume: str | None, overwrite: bool = False
                 ) -> tuple[dict[str, float], bool]:
    """Initialise torch.distributed and logging, then :func:`siamese_detr.runner.run` (``resume``
    ``auto`` = OUT/last.pt); returns its metrics and whether this process is rank 0. A folder
    that holds a previous run is refused unless ``resume`` or ``overwrite``."""
    check_run_folder(Path(cfg.output_dir), resume, overwrite)  # every rank: all refuse
    from siamese_detr.engine.distributed import cleanup, init_distributed
    from siamese_detr.engine.logging import setup_logging
    from siamese_detr.runner import run

    run_dir = Path(cfg.output_dir)
    fresh = not run_dir.exists()
    info = init_distributed(cfg.engine.device)
    setup_logging(info.is_main, run_dir / "log.txt")
    try:
        return run(cfg, info, resume), info.is_main
    except (UserError, ConfigError):
        if fresh and info.is_main:
            _remove_unused_run_folder(run_dir)
        raise
    finally:
        cleanup()


def _remove_unused_run_folder(run_dir: Path) -> None:
    """A run that failed on a user mistake before training leaves no folder behind."""
    import logging

    from siamese_detr.engine.logging import get_logger

    if not run_dir.is_dir() or any(p.name not in ("log.txt", "config.yaml")
                                   for p in run_dir.iterdir()):
        return
    for logger in (get_logger(), logging.getLogger()):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and \
                    Path(handler.baseFilename).parent == run_dir.resolve():
                logger.removeHandler(handler)
                handler.close()
    for p in run_dir.iterdir():
        p.unlink(missing_ok=True)
    run_dir.rmdir()
