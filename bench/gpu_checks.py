"""Parity checks of the fast paths, for ``bench/bench_gpu.py --check``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def run_all(device: torch.device) -> Iterator[dict[str, Any]]:
    yield from ()
