"""ONNX export of a fine-tuned detector, checked against PyTorch with onnxruntime.

The graph takes ``images [B, 3, H, W]`` float32, already resized and normalised with the
ImageNet mean/std (no padding: every pixel is image) and returns

* ``scores [B, Q, K]``: class probabilities of the last decoder layer (softmax without the
  no-object column for DETR's cross-entropy head, sigmoid for the focal heads of
  Conditional / Deformable DETR); column ``k`` is label ``k`` (= COCO category id);
* ``boxes [B, Q, 4]``: absolute ``x0, y0, x1, y1`` in pixels of the input tensor.

The batch size is free. DETR and Conditional DETR also take any ``H, W``; Deformable DETR's
sampling grid is traced for the export size, so its graph has fixed ``H, W`` (pad or resize
inputs to it). Exported with the TorchScript exporter (``dynamo=False``): it traces these
models in seconds and keeps the free dimensions symbolic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from siamese_detr.ops.boxes import box_cxcywh_to_xyxy
from siamese_detr.structures import ImageBatch

__all__ = ["OnnxCheck", "OnnxDetector", "check_onnx", "export_onnx"]


class OnnxDetector(nn.Module):
    """``images -> (scores, boxes)`` around a :class:`~siamese_detr.models.detector.Detector`
    (see the module docstring); the scores follow ``detector.head_activation``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.softmax = detector.head_activation == "softmax"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        B, _, H, W = images.shape
        mask = torch.zeros((B, H, W), dtype=torch.bool, device=images.device)
        sizes = torch.tensor([[H, W]], device=images.device).expand(B, 2)
        out = self.detector(ImageBatch(images=images, mask=mask, sizes=sizes))
        logits, boxes = out.logits[-1], out.boxes[-1]
        scores = logits.softmax(-1)[..., :-1] if self.softmax else logits.sigmoid()
        scale = torch.stack([torch.tensor(W), torch.tensor(H)]).to(boxes).repeat(2)
        return scores, box_cxcywh_to_xyxy(boxes) * scale


def export_onnx(wrapper: OnnxDetector, path: str | Path, height: int, width: int,
                opset: int = 17) -> Path:
    """Trace ``wrapper`` at ``[1, 3, height, width]`` and write the ONNX file ``path``
    (atomically, through :func:`siamese_detr.files.write_bytes`)."""
    import io

    from siamese_detr.files import write_bytes

    variant = getattr(wrapper.detector, "variant", "")
    axes: dict[int, str] = {0: "batch"}
    if variant != "deformable":
        axes.update({2: "height", 3: "width"})
    example = torch.zeros(1, 3, height, width)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python-side shape checks
        torch.onnx.export(
            wrapper.eval(), (example,), buffer, dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["scores", "boxes"],
            dynamic_axes={"images": axes, "scores": {0: "batch"}, "boxes": {0: "batch"}},
        )
    path = Path(path)
    write_bytes(path, buffer.getvalue())
    return path


@dataclass
class OnnxCheck:
    """Max absolute differences between onnxruntime and PyTorch on one input."""

    shape: tuple[int, ...]
    scores: float
    boxes: float

    @property
    def max_abs(self) -> float:
        return max(self.scores, self.boxes)


def check_onnx(wrapper: OnnxDetector, path: str | Path, images: Tensor) -> OnnxCheck:
    """Run the ONNX file with onnxruntime (CPU) and ``wrapper`` in PyTorch on ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.detach().cpu().numpy()})
    with torch.no_grad():
        want = wrapper.eval()(images)
    diffs = [float(abs(torch.from_numpy(g) - w.cpu()).max()) for g, w in zip(got, want)]
    return OnnxCheck(tuple(images.shape), diffs[0], diffs[1])
