"""A label-free stand-in for SwAV at toy scale: a ResNet-18 that learns which shipped photo a
random crop comes from (photo-id pseudo-labels, no annotation used).

The paper freezes a *self-supervised* ImageNet backbone during pretraining; the demo cannot
download one, and a random backbone gives region features and crop embeddings with nothing
semantic to transfer. Telling apart the 12 photos from scale-, flip- and brightness-augmented
crops is a cheap pretext that yields texture/colour/object-sensitive features in about two
minutes on two CPU cores. The file it writes is a torchvision ResNet-18 state dict (``fc``
dropped) whose BatchNorm statistics come from the same crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.demo.synthetic import photo_names, shipped_photo
from siamese_detr.engine.checkpoint import save_checkpoint
from siamese_detr.engine.logging import get_logger

_MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
_STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _crops(photos: list[torch.Tensor], rng: np.random.Generator, n: int, size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` augmented square crops ``[n, 3, size, size]`` (normalised) and photo ids."""
    xs, ys = [], []
    for _ in range(n):
        k = int(rng.integers(len(photos)))
        photo = photos[k]
        h, w = photo.shape[1:]
        side = int(rng.uniform(0.15, 0.7) * min(h, w))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = F.interpolate(photo[None, :, y0:y0 + side, x0:x0 + side], size=(size, size),
                             mode="bilinear", align_corners=False)[0]
        crop = crop * float(rng.uniform(0.5, 1.2)) + float(rng.uniform(-0.1, 0.1))
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        xs.append((crop.clamp(0, 1) - _MEAN) / _STD)
        ys.append(k)
    return torch.stack(xs), torch.tensor(ys)


def train_photo_backbone(path: str | Path, steps: int = 300, batch_size: int = 32,
                         crop_size: int = 96, seed: int = 0,
                         device: torch.device | str = "cpu") -> float:
    """Train (on ``device``) and save the backbone; returns the mean loss of the last 50
    steps."""
    names = photo_names()
    photos = [torch.from_numpy(shipped_photo(n)).permute(2, 0, 1).float() / 255 for n in names]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=len(names)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    log = get_logger()
    report_every = max(1, steps // 10)
    for step in range(steps):
        x, y = _crops(photos, rng, batch_size, crop_size)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # read only when reporting and at the end
        if (step + 1) % report_every == 0 or step + 1 == steps:  # minutes long: show progress
            log.info("backbone warm-up: step %d/%d, loss %.3f", step + 1, steps,
                     float(losses[-1]))
    tail = torch.stack(losses[-50:]).mean().item() if losses else float("nan")
    state = {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    save_checkpoint(state, path)  # atomic
    return float(tail)
