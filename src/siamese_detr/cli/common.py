"""Shared CLI plumbing: preset + YAML + ``key.sub=value`` overrides -> a validated RunConfig."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from siamese_detr.config import RunConfig
from siamese_detr.configio import apply_overrides, load_yaml
from siamese_detr.errors import ConfigError
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


def run_training(cfg: RunConfig, resume: str | None) -> tuple[dict[str, float], bool]:
    """Initialise torch.distributed and logging, then :func:`siamese_detr.runner.run` (``resume``
    ``auto`` = OUT/last.pt); returns its metrics and whether this process is rank 0."""
    from siamese_detr.engine.distributed import cleanup, init_distributed
    from siamese_detr.engine.logging import setup_logging
    from siamese_detr.runner import run

    info = init_distributed(cfg.engine.device)
    setup_logging(info.is_main, Path(cfg.output_dir) / "log.txt")
    try:
        return run(cfg, info, resume), info.is_main
    finally:
        cleanup()
