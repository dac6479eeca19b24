"""Package logger (rank-0 filtered), JSON-lines metrics and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

LOGGER_NAME = "siamese_detr"


def setup_logging(is_main: bool = True, log_file: Path | None = None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = True  # root has no handler unless a host app (or pytest) adds one
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (and mirrors scalars to TensorBoard)."""

    def __init__(self, path: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                get_logger().warning("tensorboard is not installed: pip install "
                                     "'siamese-detr[tensorboard]'; continuing without it")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        clean = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
                 for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return out
