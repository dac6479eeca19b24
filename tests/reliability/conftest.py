"""Shared fixtures of the reliability suite: a tiny unlabeled set with a proposal store and a
tiny detection set, and a helper that runs the real command line as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# seconds; a safety net only: every test ends on the command's own exit
SAFETY_TIMEOUT = float(os.environ.get("RELIABILITY_SAFETY_TIMEOUT", "240"))


def run_cli(*args: str, timeout: float = SAFETY_TIMEOUT, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``python -m siamese_detr ARGS`` (PYTHONPATH inherited), output captured as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "siamese_detr", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, check=False)


def start_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m siamese_detr ARGS`` in the background, stdout and stderr into ``log``."""
    handle = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "siamese_detr", *args], stdout=handle,
                            stderr=subprocess.STDOUT, env=dict(os.environ))


def wait_for(predicate, proc: subprocess.Popen[bytes], what: str) -> None:
    """Poll ``predicate()`` until true; fail (and kill ``proc``) if the process ends first or
    the safety net expires."""
    import time

    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"safety net: no {what} after {SAFETY_TIMEOUT} s")
        time.sleep(0.2)


def sigterm_when(predicate, proc: subprocess.Popen[bytes], what: str) -> int:
    """Send SIGTERM once ``predicate()`` holds (see :func:`wait_for`) and return the exit code;
    the process is killed if it is still running after that."""
    import signal

    try:
        wait_for(predicate, proc, what)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=SAFETY_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    """``n`` PNG pictures ``size=(w, h)`` with a few bright rectangles; returns file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    w, h = size
    for i in range(n):
        img = np.full((h, w, 3), 90, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
        name = f"img{i:03d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="session")
def unlabeled(tmp_path_factory) -> dict[str, Path]:
    """8 images 96x96 and a random-box proposal store built from them."""
    from siamese_detr.proposals.generate import generate_proposals

    root = tmp_path_factory.mktemp("unlabeled")
    write_images(root / "images", 8, (96, 96), seed=0)
    generate_proposals(root / "images", root / "store", method="random", workers=1,
                       chunk_size=4, progress=False)
    return {"root": root, "images": root / "images", "store": root / "store"}


def pretrain_args(data: dict[str, Path], out: Path, iters: int = 2, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "tiny/vanilla/siamese", "--out", str(out),
            f"pretrain.images={data['images']}", f"pretrain.proposals.store={data['store']}",
            "pretrain.siamese.base_scales=64", "pretrain.batch_size=2",
            f"optim.length={iters}", f"optim.lr_drops={iters}",
            "engine.log_every=1", "engine.progress=false", "engine.keep_checkpoints=0",
            "engine.device=cpu", *extra]
