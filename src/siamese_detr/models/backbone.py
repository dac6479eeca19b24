"""ResNet feature extractor with DETR's frozen batch norm, and backbone weight loading.

Parameter names follow torchvision (``body.conv1.weight``, ``body.layer1.0.conv1.weight``,
``body.layer1.0.downsample.1.running_mean``, ...), so in the detector they read
``backbone.body.*``. Every parameter that trains in the backbone lies under ``backbone.``
(use that prefix for the backbone learning-rate group).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

from siamese_detr.config import ConfigError

__all__ = ["RANDOM_WEIGHTS", "Backbone", "FoldedConv2d", "FrozenBatchNorm2d", "LoadReport",
           "fold_frozen_bn", "load_backbone_weights"]

#: ``model.backbone.weights=random``: a randomly initialised backbone, on purpose (no warning)
RANDOM_WEIGHTS = "random"

Freeze = Literal["all", "stem+layer1", "none"]
WeightsFormat = Literal["auto", "swav", "torchvision", "safetensors"]
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (DETR semantics, eps 1e-5).

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` have the same names as in
    ``nn.BatchNorm2d``, so its state dicts load here; ``num_batches_tracked`` is ignored.
    ``[B, C, H, W] -> [B, C, H, W]``: ``(x - running_mean) / sqrt(running_var + eps) * weight
    + bias`` in every mode.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    folded = False  # set by fold_frozen_bn: the convolution before it applies it

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` per channel, with ``forward(x) = x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        # inference-mode batch norm: one fused op each way (the statistics are never updated),
        # and a bfloat16 input stays bfloat16 under autocast instead of promoting to float32
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FoldedConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` that applies the :class:`FrozenBatchNorm2d` after it, folded
    into its weight and bias: ``conv(x, W * scale) + shift`` instead of a convolution and then
    a pass of the batch norm over the whole activation map. The frozen backbone's batch norms
    were 4.8 ms of kernels in a 17.9 ms Siamese pretraining forward at batch 8 on the H100,
    yet folding them changed the graphed step times by 0.96-1.04x there (session 8): on CUDA
    PyTorch adds a convolution's bias after cuDNN, as a broadcast pass over the map, so the
    passes stay. :func:`Backbone.use_fused_conv_relu` removes that pass, and relies on these
    folds. On a CPU folding removes 212 ops per pretraining step.

    Made by :func:`fold_frozen_bn`, which changes the class of an existing convolution, so the
    parameters, buffers and state-dict keys of both modules stay where they were (the batch
    norm keeps its buffers and becomes the identity). The folded weight and bias are derived
    from the live tensors: cached while the convolution's weight does not train, and
    recomputed when any of the five tensors changes (in-place writes such as
    ``load_state_dict`` included: tensor versions are part of the cache key). While a CUDA
    graph is captured they are recomputed inside the graph, so every replay reads the current
    weights, as it does for an unfolded convolution.
    """

    _folded_bn: list[FrozenBatchNorm2d]  # a list: the batch norm is not a child module here
    _fold_cache: tuple[tuple, Tensor, Tensor] | None
    _fold_now: tuple[Tensor, Tensor] | None = None  # set by fold_all for one forward

    def folded(self) -> tuple[Tensor, Tensor]:
        """The weight and bias of the convolution with the batch norm folded in."""
        if self._fold_now is not None:
            return self._fold_now
        bn = self._folded_bn[0]
        tensors = (self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        context = _CACHE_CONTEXT.get()  # decided once per backbone forward
        if context is None:  # a folded convolution called on its own
            context = _cache_context_ok(self.weight)
        cacheable = context and not _grad_through(self.weight)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if cacheable and self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1], self._fold_cache[2]
        scale, shift = bn.scale_shift()
        weight = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        bias = shift.to(self.weight.dtype)
        self._fold_cache = (key, weight.detach(), bias.detach()) if cacheable else None
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        return self._conv_forward(x, weight, bias)


def fold_all(convs: Sequence[FoldedConv2d]) -> bool:
    """Compute the folded weights and biases of all ``convs`` at once, with a few multi-tensor
    (``torch._foreach_*``) kernels instead of five small kernels per convolution, for their
    next forward (:meth:`Backbone.forward` uses it inside a CUDA graph capture, where they
    are recomputed on every replay; :func:`clear_fold_all` ends it). False, and nothing set,
    when the tensors do not share one dtype and device."""
    bns = [c._folded_bn[0] for c in convs]
    tensors = [t for c, bn in zip(convs, bns) for t in (c.weight, bn.weight, bn.bias,
                                                         bn.running_mean, bn.running_var)]
    if not convs or len({(t.dtype, t.device) for t in tensors}) != 1:
        return False
    inv = torch._foreach_rsqrt(torch._foreach_add([bn.running_var for bn in bns],
                                                  [float(bn.eps) for bn in bns]))
    scale = torch._foreach_mul([bn.weight for bn in bns], inv)
    shift = torch._foreach_sub([bn.bias for bn in bns],
                               torch._foreach_mul([bn.running_mean for bn in bns], scale))
    for c, sc, sh in zip(convs, scale, shift):
        c._fold_now = (c.weight * sc[:, None, None, None], sh)
    return True


def clear_fold_all(convs: Sequence[FoldedConv2d]) -> None:
    for c in convs:
        c._fold_now = None


def _cache_context_ok(weight: Tensor) -> bool:
    """May folded weights be cached here? Not from inference mode (its tensors cannot enter
    autograd later), a graph capture or a compile trace (a replay must read the live
    weights), or a side stream (make_graphed_callables' warm-up: the cache is read on other
    streams)."""
    return not (torch.is_inference_mode_enabled() or _capturing()
                or (weight.is_cuda and torch.cuda.current_stream(weight.device)
                    != torch.cuda.default_stream(weight.device)))


#: set by :meth:`Backbone.forward` for its convolutions: the checks of
#: :func:`_cache_context_ok` once per forward instead of once per convolution
_CACHE_CONTEXT: ContextVar[bool | None] = ContextVar("fold_cache_context", default=None)


def _capturing() -> bool:
    """Is a CUDA graph being captured on the current stream, or is ``torch.compile``
    tracing (which has no tensor versions to key a cache on)?"""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _conv_bn_pairs(body: nn.Module) -> list[tuple[nn.Conv2d, nn.Module]]:
    """Every ``(convolution, batch norm)`` pair of a torchvision ResNet trunk, in order."""
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []
    if hasattr(body, "conv1") and hasattr(body, "bn1"):
        pairs.append((body.conv1, body.bn1))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(body, name, ()):
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    pairs.append((getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            if block.downsample is not None:
                pairs.append((block.downsample[0], block.downsample[1]))
    return pairs


def fold_frozen_bn(body: nn.Module) -> int:
    """Fold each :class:`FrozenBatchNorm2d` that follows a frozen, bias-free convolution into
    it (:class:`FoldedConv2d`); returns how many were folded. The outputs are the same up to
    floating-point rounding; the state dict is unchanged."""
    done = 0
    for conv, bn in _conv_bn_pairs(body):
        if (type(conv) is nn.Conv2d and conv.bias is None and not conv.weight.requires_grad
                and isinstance(bn, FrozenBatchNorm2d)):
            conv.__class__ = FoldedConv2d
            conv._folded_bn = [bn]
            conv._fold_cache = None
            bn.folded = True
            done += 1
    return done


# cuDNN's fused convolutions (``model.backbone.fused_conv_relu``), looked up here at each call
# so that the CPU tests can put reference implementations in their place:
# relu(conv(x, w) + bias) and relu(conv(x, w) + alpha * z + bias)
cudnn_conv_relu = torch.cudnn_convolution_relu
cudnn_conv_add_relu = torch.cudnn_convolution_add_relu


def _grad_through(t: Tensor) -> bool:
    """Would autograd record an op on ``t`` now?"""
    return torch.is_grad_enabled() and t.requires_grad


def _fusable(x: Tensor) -> bool:
    """May frozen units run as cuDNN's fused convolutions on ``x``? On CUDA with cuDNN, when
    no gradient is wanted through ``x`` (cuDNN's fused convolutions have no backward), and
    not while ``torch.compile`` or ``torch.export`` traces (they have no meta kernels), nor
    under deterministic algorithms (``engine.deterministic``: PyTorch calls them with
    ``deterministic=False``)."""
    return (x.is_cuda and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
            and not _grad_through(x)
            and not torch.compiler.is_compiling()
            and not torch.are_deterministic_algorithms_enabled())


def _unit_convs_fusable(convs: Sequence[nn.Module]) -> bool:
    """Are these convolutions all folded (frozen), with zero padding given as numbers, and
    none of their weights training right now?"""
    return all(isinstance(c, FoldedConv2d) and c.padding_mode == "zeros"
               and not isinstance(c.padding, str)
               and not _grad_through(c.weight) for c in convs)


def _fused_conv(conv: FoldedConv2d, x: Tensor, z: Tensor | None = None,
                extra_bias: Tensor | None = None) -> Tensor:
    """``relu(conv(x) + z)`` (``z`` optional) in one cuDNN call, with the folded weight and
    bias (plus ``extra_bias``). cuDNN's fused ops are not in autocast's lists, so they are
    given autocast's dtype here, as the convolution they replace would be."""
    weight, bias = conv.folded()
    if extra_bias is not None:
        bias = bias + extra_bias
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    if z is None:
        return cudnn_conv_relu(x, weight, bias, *geometry)
    return cudnn_conv_add_relu(x, weight, z.to(dtype), 1.0, bias, *geometry)


def _block_convs(block: nn.Module) -> list[nn.Module] | None:
    """The convolutions of a torchvision ``BasicBlock`` / ``Bottleneck`` in order, the last
    one being the one the residual is added to; None for another module."""
    if not isinstance(block, BasicBlock | Bottleneck):
        return None
    return [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])


def _fused_block(block: nn.Module, x: Tensor) -> Tensor | None:
    """A frozen residual block as cuDNN fused convolutions: each convolution with its folded
    batch norm and ReLU in one call, the last one with the residual added before its ReLU
    (a downsampling convolution's folded bias joins the last one's). None when the block
    cannot be fused (it trains, or is not a torchvision block)."""
    convs = _block_convs(block)
    down = getattr(block, "downsample", None)
    extra = [] if down is None else list(down)
    if convs is None or not _unit_convs_fusable(convs + extra[:1]):
        return None
    if down is not None and (len(extra) != 2 or not getattr(extra[1], "folded", False)):
        return None
    out = x
    for conv in convs[:-1]:
        out = _fused_conv(conv, out)
    if down is None:
        return _fused_conv(convs[-1], out, z=x)
    dconv = extra[0]
    weight, bias = dconv.folded()
    identity = F.conv2d(x, weight, None, dconv.stride, dconv.padding, dconv.dilation,
                        dconv.groups)
    return _fused_conv(convs[-1], out, z=identity, extra_bias=bias)


class _Body(nn.Module):
    """The ResNet trunk without ``avgpool``/``fc``; returns the requested stage outputs."""

    fuse_conv_relu = False  # set by Backbone.use_fused_conv_relu

    def __init__(self, resnet: nn.Module, return_stages: Sequence[str]) -> None:
        super().__init__()
        last = max(_STAGES.index(s) for s in return_stages)
        for name in _STAGES[: last + 1]:
            self.add_module(name, getattr(resnet, name))
        self.return_stages = tuple(return_stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        fuse = self.fuse_conv_relu and _fusable(x)
        stem_fused = False
        for name, module in self.named_children():
            if fuse and name == "conv1" and _unit_convs_fusable([module]) and getattr(
                    self.bn1, "folded", False):
                x, stem_fused = _fused_conv(module, x), True  # conv1 + bn1 + relu
            elif stem_fused and name in ("bn1", "relu"):
                pass
            elif fuse and name.startswith("layer"):
                for block in module:
                    # the rest of _fusable holds for the whole forward; a block after one
                    # that trains gets an input with a gradient
                    fused = None if _grad_through(x) else _fused_block(block, x)
                    x = block(x) if fused is None else fused
            else:
                x = module(x)
            if name in self.return_stages:
                out.append(x)
        return out


class Backbone(nn.Module):
    """torchvision ResNet-18/34/50 (``weights=None``) returning C5 or several levels.

    Args:
        depth: 18, 34 or 50.
        return_levels: ResNet levels to return, from {2, 3, 4, 5} (``C_l`` has stride
            ``2**l``), e.g. ``(5,)`` or ``(3, 4, 5)``.
        frozen_bn: use :class:`FrozenBatchNorm2d` instead of ``nn.BatchNorm2d``.
        freeze: "all" (no parameter trains), "stem+layer1" (DETR fine-tuning: conv1/bn1 and
            layer1 frozen) or "none".
        fold_bn: fold the frozen batch norms into the frozen convolutions before them
            (:func:`fold_frozen_bn`): the whole trunk when ``freeze="all"`` (pretraining), the
            stem and layer1 for DETR fine-tuning.

    Attributes:
        strides: stride of each returned level, e.g. ``[8, 16, 32]``.
        num_channels: channels of each returned level, e.g. ``[512, 1024, 2048]`` (R50).
    """

    def __init__(
        self,
        depth: int = 50,
        return_levels: Sequence[int] = (5,),
        frozen_bn: bool = True,
        freeze: Freeze = "stem+layer1",
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        match depth:
            case 18:
                resnet, base = resnet18(weights=None, norm_layer=norm_layer), 64
            case 34:
                resnet, base = resnet34(weights=None, norm_layer=norm_layer), 64
            case 50:
                resnet, base = resnet50(weights=None, norm_layer=norm_layer), 256
            case _:
                raise ConfigError(f"model.backbone.depth={depth} is not supported (18, 34, 50)")
        levels = sorted(set(return_levels))
        if not levels or any(level not in (2, 3, 4, 5) for level in levels):
            raise ValueError(f"return_levels must be a subset of (2, 3, 4, 5), got {return_levels}")
        self.depth = depth
        self.freeze: Freeze = freeze
        self.body = _Body(resnet, [f"layer{level - 1}" for level in levels])
        self.strides = [2**level for level in levels]
        self.num_channels = [base * 2 ** (level - 2) for level in levels]
        match freeze:
            case "all":
                trainable: tuple[str, ...] = ()
            case "stem+layer1":
                trainable = ("layer2", "layer3", "layer4")
            case "none":
                trainable = _STAGES
            case _:
                raise ConfigError(
                    f"model.backbone.freeze={freeze!r} is not one of all, stem+layer1, none"
                )
        for name, param in self.body.named_parameters():
            param.requires_grad_(name.split(".")[0] in trainable)
        self.fold_bn = fold_bn
        self.folded_bn = fold_frozen_bn(self.body) if fold_bn else 0

    def freeze_all(self) -> None:
        """No parameter trains from now on (the pretext tasks); with ``fold_frozen_bn``, the
        batch norms of the stages frozen now are folded too."""
        self.requires_grad_(False)
        if self.fold_bn:
            self.folded_bn += fold_frozen_bn(self.body)

    @property
    def fully_frozen(self) -> bool:
        """True when no backbone parameter trains (features can be computed under no_grad)."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> Backbone:
        # a completely frozen backbone never updates batch-norm statistics
        super().train(mode and self.freeze != "all")
        return self

    channels_last = False  # set by use_channels_last

    def use_channels_last(self) -> None:
        """Run the trunk in the channels-last memory format (``model.backbone.channels_last``):
        weights converted once, each batch on entry. Same values, other kernels; the features
        come out channels-last."""
        self.channels_last = True
        self.body.to(memory_format=torch.channels_last)

    def use_fused_conv_relu(self) -> None:
        """Run the frozen, folded units (stem, residual blocks) of the trunk as cuDNN's fused
        convolutions on CUDA, where no gradient flows through them
        (``model.backbone.fused_conv_relu``): each convolution, its folded batch norm, the
        residual add and the ReLU in one kernel, instead of a convolution, a broadcast bias
        add over the whole activation map (PyTorch adds a convolution's bias after cuDNN), an
        add and a ReLU. Same values up to rounding; nothing changes on the CPU. Needs the
        folded batch norms (``fold_bn``)."""
        if not self.fold_bn:
            raise ConfigError("model.backbone.fused_conv_relu=true needs "
                              "model.backbone.fold_frozen_bn=true")
        self.body.fuse_conv_relu = True

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B, 3, H, W]`` -> per level ``[B, C_l, ceil(H/s_l), ceil(W/s_l)]``."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not self.folded_bn:
            return self.body(images)
        if _capturing():  # a graph recomputes the folds at each replay
            convs = [m for m in self.body.modules() if isinstance(m, FoldedConv2d)]
            if fold_all(convs):
                try:
                    return self.body(images)
                finally:
                    clear_fold_all(convs)
        token = _CACHE_CONTEXT.set(_cache_context_ok(self.body.conv1.weight))
        try:
            return self.body(images)
        finally:
            _CACHE_CONTEXT.reset(token)


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did (keys in torchvision naming, no ``body.``)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone keys the file lacks
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone lacks
    dropped: list[str] = field(default_factory=list)  # known extras: heads, fc, counters


def _read(path: Path, fmt: WeightsFormat) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"model.backbone.weights: file {str(path)!r} does not exist")
    use_st = fmt == "safetensors" or (fmt == "auto" and path.suffix == ".safetensors")
    try:
        if use_st:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user-facing file problem
        kind = "safetensors" if use_st else "torch"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"model.backbone.weights: cannot read {str(path)!r} as a {kind} file ({msg})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.backbone.weights: {str(path)!r} does not hold a state dict of tensors"
        )
    return obj


def _is_dropped(key: str, fmt: WeightsFormat) -> bool:
    if key.endswith("num_batches_tracked"):
        return True
    swav = key.startswith(("projection_head.", "prototypes."))
    tv = key.startswith("fc.")
    match fmt:
        case "swav":
            return swav
        case "torchvision":
            return tv
        case "auto" | "safetensors":
            return swav or tv
    return False


def load_backbone_weights(
    backbone: Backbone,
    path: str | Path,
    fmt: WeightsFormat = "auto",
    allow_missing: bool = False,
) -> LoadReport:
    """Load ResNet weights into ``backbone.body`` (non-strict on extras, strict on coverage).

    Accepted files: a SwAV release (optionally ``{"state_dict": ...}``, keys prefixed
    ``module.``, extra ``projection_head.*`` / ``prototypes.*``), a torchvision ResNet state
    dict (``fc.*`` dropped) or a ``.safetensors`` file with torchvision key names.
    ``torch.load`` is always called with ``weights_only=True``.

    Raises:
        ConfigError: unreadable file, shape mismatch, or backbone keys missing from the file
            (unless ``allow_missing``).
    """
    path = Path(path)
    raw = _read(path, fmt)
    target = backbone.body.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix("module.")
        if name in target:
            if tuple(value.shape) != tuple(target[name].shape):
                raise ConfigError(
                    f"model.backbone.weights: {str(path)!r} key {name!r} has shape "
                    f"{tuple(value.shape)}, the ResNet-{backbone.depth} backbone expects "
                    f"{tuple(target[name].shape)} (check model.backbone.depth)"
                )
            to_load[name] = value.to(target[name].dtype)
            report.loaded.append(name)
        elif _is_dropped(name, fmt):
            report.dropped.append(name)
        else:
            report.unexpected.append(name)
    report.missing = [
        k for k in target if k not in to_load and not k.endswith("num_batches_tracked")
    ]
    if report.missing and not allow_missing:
        shown = ", ".join(report.missing[:5])
        raise ConfigError(
            f"model.backbone.weights: {str(path)!r} lacks {len(report.missing)} backbone keys "
            f"(first: {shown}); set model.backbone.allow_missing_keys=true to accept this"
        )
    backbone.body.load_state_dict(to_load, strict=False)
    return report
