"""Backbone: FrozenBatchNorm2d, levels/freezing, and weight loading in the three formats."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18

from siamese_detr.config import ConfigError
from siamese_detr.models.backbone import Backbone, FrozenBatchNorm2d, load_backbone_weights


def _random_bn(n: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    return bn.eval()


def test_frozen_bn_equals_batchnorm_eval() -> None:
    torch.manual_seed(0)
    bn = _random_bn(6)
    frozen = FrozenBatchNorm2d(6)
    result = frozen.load_state_dict(bn.state_dict())  # includes num_batches_tracked
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    frozen.train()  # no batch statistics in any mode
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize(
    ("levels", "strides", "channels"),
    [((5,), [32], [512]), ((3, 4, 5), [8, 16, 32], [128, 256, 512])],
)
def test_backbone_levels(levels, strides, channels) -> None:
    bb = Backbone(18, levels).eval()
    assert bb.strides == strides and bb.num_channels == channels
    feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, strides)
    ]
    names = dict(bb.named_parameters())
    assert "body.conv1.weight" in names and "body.layer1.0.conv1.weight" in names
    assert not any(k.startswith(("body.fc", "body.avgpool")) for k in bb.state_dict())


def test_freeze_modes() -> None:
    frozen = {n for n, p in Backbone(18, freeze="stem+layer1").named_parameters()
              if not p.requires_grad}
    assert "body.conv1.weight" in frozen and "body.layer1.1.conv2.weight" in frozen
    assert not any(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in frozen)
    assert Backbone(18, freeze="all").fully_frozen
    assert all(p.requires_grad for p in Backbone(18, freeze="none").parameters())
    bn_all = Backbone(18, freeze="all", frozen_bn=False).train()
    assert not bn_all.training and not bn_all.body.bn1.training  # stats never update


def _torchvision_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(bb: Backbone, ref: dict[str, torch.Tensor]) -> None:
    for key, value in bb.body.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=0)


def _n_target_keys() -> int:
    return len(Backbone(18).body.state_dict())


def test_load_torchvision(tmp_path) -> None:
    ref = _torchvision_state()
    path = tmp_path / "r18.pth"
    torch.save(ref, path)
    bb = Backbone(18)
    report = load_backbone_weights(bb, path, "torchvision")
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert not report.unexpected
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(report.dropped)


def test_load_swav(tmp_path) -> None:
    ref = _torchvision_state()
    wrapped = {"module." + k: v for k, v in ref.items() if not k.startswith("fc.")}
    wrapped["module.projection_head.0.weight"] = torch.randn(8, 512)
    wrapped["module.prototypes.weight"] = torch.randn(3, 8)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save({"state_dict": wrapped, "epoch": 800}, path)
    bb = Backbone(18)
    report = load_backbone_weights(bb, path)  # auto-detected
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert not report.unexpected
    assert {"projection_head.0.weight", "prototypes.weight"} <= set(report.dropped)
    # explicitly as swav: same result
    bb2 = Backbone(18)
    load_backbone_weights(bb2, path, "swav")
    _assert_loaded(bb2, ref)


def test_load_safetensors(tmp_path) -> None:
    ref = _torchvision_state()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items() if "num_batches" not in k}, str(path))
    bb = Backbone(18, return_levels=(3, 4, 5))
    report = load_backbone_weights(bb, path, "safetensors")
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert set(report.dropped) == {"fc.weight", "fc.bias"} and not report.unexpected


def test_missing_keys(tmp_path) -> None:
    ref = _torchvision_state()
    partial = {k: v for k, v in ref.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(ConfigError, match="allow_missing_keys=true") as err:
        load_backbone_weights(Backbone(18), path)
    assert "partial.pth" in str(err.value) and "layer4.0.conv1.weight" in str(err.value)
    bb = Backbone(18)
    before = bb.body.layer4[0].conv1.weight.clone()
    report = load_backbone_weights(bb, path, allow_missing=True)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    torch.testing.assert_close(bb.body.conv1.weight, ref["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bb.body.layer4[0].conv1.weight, before, rtol=0, atol=0)


def test_bad_files(tmp_path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        load_backbone_weights(Backbone(18), junk)
    with pytest.raises(ConfigError, match="nope.pth"):
        load_backbone_weights(Backbone(18), tmp_path / "nope.pth")
    wrong = tmp_path / "r18.pth"
    torch.save(_torchvision_state(), wrong)
    with pytest.raises(ConfigError, match="shape"):
        load_backbone_weights(Backbone(50), wrong)


def test_frozen_bn_keeps_bfloat16() -> None:
    bn = FrozenBatchNorm2d(4)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.randn(2, 4, 3, 5)
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16  # no float32 copy of a bfloat16 feature map
    expected = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + 1e-5
                                                       ).sqrt() * bn.weight[:, None, None]
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ folded batch norms


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random convolution weights and batch-norm statistics (not the identity batch norms of
    a fresh model), so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 2.8 + 0.2)
            elif name.endswith(("running_mean", "bias")) or ".bn" in name or "downsample.1" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name.endswith(
                    "weight") else 0.0))
    return model


def _pair(freeze: str, depth: int = 18) -> tuple[Backbone, Backbone]:
    plain = _randomised(Backbone(depth, (3, 4, 5), freeze=freeze))  # type: ignore[arg-type]
    folded = Backbone(depth, (3, 4, 5), freeze=freeze, fold_bn=True)  # type: ignore[arg-type]
    folded.load_state_dict(plain.state_dict())
    return plain, folded


@pytest.mark.parametrize(("freeze", "count"), [("all", 20), ("stem+layer1", 5), ("none", 0)])
def test_folded_batchnorm_same_outputs_and_state_dict(freeze: str, count: int) -> None:
    """Only frozen convolutions are folded (ResNet-18: 20 convolution + batch-norm pairs; the
    stem and layer1 hold 5); outputs equal the unfolded backbone's up to rounding, and the
    state dict has the same keys and values."""
    from siamese_detr.models.backbone import FoldedConv2d

    plain, folded = _pair(freeze)
    assert folded.folded_bn == count
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == count
    a, b = plain.state_dict(), folded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(2):  # the second call reads the cached folded weights
            for p, f in zip(plain(x), folded(x)):
                assert torch.allclose(p, f, rtol=1e-5, atol=1e-5 * p.abs().max().item())


def test_folded_batchnorm_gradients_of_the_trained_stages() -> None:
    """DETR fine-tuning folds the frozen stem and layer1: the gradients of layer2-4 are those
    of the unfolded backbone."""
    plain, folded = _pair("stem+layer1")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for model in (plain, folded):
        sum((f * f).mean() for f in model(x)).backward()
    for (name, p), (_, f) in zip(plain.named_parameters(), folded.named_parameters()):
        if p.requires_grad:
            assert f.grad is not None, name
            scale = p.grad.abs().max().item()
            assert (p.grad - f.grad).abs().max().item() <= 1e-5 * scale, name  # 6e-7 here


def test_folded_batchnorm_follows_weight_changes_and_copies() -> None:
    """The cache of the folded weights is keyed on the tensors' versions: ``load_state_dict``
    (in-place copies) after a forward, a dtype change and a deep copy all give the outputs of
    an unfolded backbone with the same weights."""
    import copy

    plain, folded = _pair("all")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        folded(x)  # fills the cache
        other = _randomised(Backbone(18, (3, 4, 5), freeze="all"), seed=7)
        folded.load_state_dict(other.state_dict())
        for p, f in zip(other(x), folded(x)):
            assert torch.allclose(p, f, rtol=1e-5, atol=1e-5 * p.abs().max().item())
        twin = copy.deepcopy(folded)
        bn = twin.body.layer1[0].bn1
        bn.running_mean.add_(1.0)  # changes the copy only
        plain_twin = Backbone(18, (3, 4, 5), freeze="all")
        plain_twin.load_state_dict(twin.state_dict())
        for p, f in zip(plain_twin(x), twin(x)):
            assert torch.allclose(p, f, rtol=1e-5, atol=1e-5 * p.abs().max().item())
        for p, f in zip(other(x), folded(x)):  # the original did not move
            assert torch.allclose(p, f, rtol=1e-5, atol=1e-5 * p.abs().max().item())
        wide, plain64 = folded.double(), other.double()
        for p, f in zip(plain64(x.double()), wide(x.double())):
            assert f.dtype == torch.float64
            assert torch.allclose(p, f, rtol=1e-10, atol=1e-10 * p.abs().max().item())


def test_folded_batchnorm_ops_and_graph_capture(monkeypatch) -> None:
    """Eager: a folded backbone's forward dispatches no batch norm and fewer ops (the folded
    weights come from the cache). While a CUDA graph is captured the folded weights are
    recomputed, so that the graph reads the live weights on every replay."""
    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.models import backbone as backbone_module

    plain, folded = _pair("all")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        folded(x)
        counts = {}
        for name, model in (("plain", plain), ("folded", folded)):
            with OpCounter() as c:
                model(x)
            counts[name] = c.ops
        # 20 batch norms gone (2 dispatches each: batch_norm and its inference kernel), the
        # convolutions take the bias: nothing added
        assert counts["folded"] == counts["plain"] - 2 * 20
        conv = folded.body.layer1[0].conv1
        assert conv._fold_cache is not None
        with torch.inference_mode():  # inference tensors must not be cached for later use
            folded(x)
        assert conv._fold_cache is None
        folded(x)
        monkeypatch.setattr(backbone_module, "_capturing", lambda: True)
        with OpCounter() as c:
            folded(x)
        assert c.ops > counts["folded"] + 20  # recomputed (fold_all: the test below)
        with OpCounter() as c:  # a folded convolution on its own recomputes its fold
            conv.folded()
        assert c.ops >= 5
        assert conv._fold_cache is None  # and keeps nothing from inside a capture


def test_channels_last_backbone_same_values_and_state_dict() -> None:
    """``model.backbone.channels_last``: the same features (other kernels, same arithmetic up
    to rounding), in the channels-last format, and the same state dict (loaded weights go
    into the converted parameters)."""
    plain, folded = _pair("stem+layer1")
    folded.use_channels_last()
    folded.load_state_dict(plain.state_dict())  # after the conversion: values copied in
    a, b = plain.state_dict(), folded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p, f in zip(plain(x), folded(x)):
            assert f.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(p, f, rtol=1e-5, atol=1e-5 * p.abs().max().item())


def test_folds_inside_a_capture_come_from_multi_tensor_kernels(monkeypatch) -> None:
    """While a CUDA graph is captured, ``Backbone.forward`` computes every fold with a few
    ``torch._foreach_*`` calls (plus one multiply per weight) instead of five small ops per
    convolution, which each replay would run; the outputs are those of the cached folds, and
    nothing is left set after the forward."""
    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.models import backbone as backbone_module
    from siamese_detr.models.backbone import FoldedConv2d

    _, folded = _pair("all")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = folded(x)
        with OpCounter() as cached:
            folded(x)
        monkeypatch.setattr(backbone_module, "_capturing", lambda: True)
        with OpCounter() as captured:
            out = folded(x)
        per_conv = 0
        for m in folded.modules():  # what the per-convolution recompute dispatches
            if isinstance(m, FoldedConv2d):
                with OpCounter() as one:
                    m._fold_cache = None
                    m.folded()
                per_conv += one.ops
    for r, o in zip(ref, out):
        assert torch.allclose(r, o, rtol=1e-6, atol=1e-6 * r.abs().max().item())
    added = captured.ops - cached.ops
    assert 20 <= added < per_conv / 2, (added, per_conv)  # 20 weight multiplies + a few
    assert all(m._fold_now is None for m in folded.modules() if isinstance(m, FoldedConv2d))


def _reference_fused_ops(monkeypatch: pytest.MonkeyPatch, fusable: bool = True
                         ) -> dict[str, int]:
    """cuDNN's fused convolutions replaced by what they compute (``relu(conv(x) + bias)``,
    ``relu(conv(x) + alpha * z + bias)``), counting calls; with ``fusable`` the fused path is
    taken on the CPU too (where no gradient flows, as on CUDA)."""
    import torch.nn.functional as F

    from siamese_detr.models import backbone as backbone_module

    calls = {"relu": 0, "add_relu": 0}

    def conv_relu(x, w, b, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
        calls["relu"] += 1
        return F.conv2d(x, w, b, stride, padding, dilation, groups).relu()

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
        calls["add_relu"] += 1
        return (F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z).relu()

    monkeypatch.setattr(backbone_module, "cudnn_conv_relu", conv_relu)
    monkeypatch.setattr(backbone_module, "cudnn_conv_add_relu", conv_add_relu)
    if fusable:
        monkeypatch.setattr(backbone_module, "_fusable",
                            lambda x: not (torch.is_grad_enabled() and x.requires_grad))
    return calls


@pytest.mark.parametrize(("depth", "freeze", "relu", "add_relu"), [
    (18, "all", 9, 8), (18, "stem+layer1", 3, 2), (18, "none", 0, 0),
    (50, "all", 33, 16), (50, "stem+layer1", 7, 3)])
def test_fused_conv_relu_same_values_and_gradients(monkeypatch, depth, freeze, relu, add_relu
                                                   ) -> None:
    """``model.backbone.fused_conv_relu``: every frozen unit, and only those, becomes fused
    convolutions (the stem: one with ReLU; a residual block: one with ReLU per convolution
    but the last, which adds the residual; ResNet-50 has 16 blocks, 3 in layer1), the
    downsampling branches included; the features equal the plain backbone's, and so do the
    gradients of the stages that train (fine-tuning: layer2-4 after a fused stem and
    layer1)."""
    calls = _reference_fused_ops(monkeypatch)
    plain, fused = _pair(freeze, depth)
    fused.use_fused_conv_relu()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    outs = []
    for model in (plain, fused):
        feats = model(x)
        if freeze != "all":
            sum(f.square().mean() for f in feats).backward()
        outs.append([f.detach() for f in feats])
    assert calls == {"relu": relu, "add_relu": add_relu}
    for p, f in zip(*outs):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5 * p.abs().max().item())
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (plain, fused)]
    assert len(grads[0]) == len(grads[1]) and (freeze == "all") == (not grads[0])
    for p, f in zip(*grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6 * p.abs().max().item())


def test_fused_conv_relu_inside_a_capture(monkeypatch) -> None:
    """Inside a CUDA graph capture the fused units read the folds ``fold_all`` recomputes for
    that forward (the replays see the live weights): the same features."""
    from siamese_detr.models import backbone as backbone_module

    calls = _reference_fused_ops(monkeypatch)
    plain, fused = _pair("all", 50)
    fused.use_fused_conv_relu()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(backbone_module, "_capturing", lambda: True)
    with torch.no_grad():
        for p, f in zip(plain(x), fused(x)):
            torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5 * p.abs().max().item())
    assert calls["relu"] == 33
    assert all(c._fold_now is None for c in fused.modules() if hasattr(c, "_fold_now"))


def test_fused_conv_relu_is_cuda_only_and_needs_the_folds(monkeypatch) -> None:
    """On the CPU the option changes nothing (cuDNN's fused ops are never called); without
    the folded batch norms it is refused, in the config and on the module, naming the key."""
    from siamese_detr.config import BackboneConfig

    calls = _reference_fused_ops(monkeypatch, fusable=False)
    plain, fused = _pair("all")
    fused.use_fused_conv_relu()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for p, f in zip(plain(x), fused(x)):
            torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5 * p.abs().max().item())
    assert calls == {"relu": 0, "add_relu": 0}
    with pytest.raises(ConfigError, match="fused_conv_relu=true needs model.backbone.fold"):
        BackboneConfig(fused_conv_relu=True, fold_frozen_bn=False)
    with pytest.raises(ConfigError, match="fold_frozen_bn=true"):
        Backbone(18, (5,), freeze="all").use_fused_conv_relu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
def test_real_fused_conv_relu_matches_unfused_on_cuda(channels_last: bool) -> None:
    """cuDNN's fused convolutions on a GPU (the real ops, counted): the frozen ResNet-50's
    features equal the folded, unfused trunk's in float32 (TF32 off) and under bfloat16
    autocast, in both memory formats; the bf16 features stay bf16. PyTorch's
    ``cudnn_convolution_relu`` hands cuDNN its uninitialised output as the residual, scaled
    by 0: the allocator's free blocks are filled with NaN first, so that reading it would
    show."""
    from siamese_detr.models import backbone as backbone_module

    real = (backbone_module.cudnn_conv_relu, backbone_module.cudnn_conv_add_relu)
    calls = {"n": 0}

    def counted(fn):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            return fn(*args)
        return call

    dev = torch.device("cuda")
    plain, fused = _pair("all", 50)
    plain, fused = plain.to(dev), fused.to(dev)
    fused.use_fused_conv_relu()
    if channels_last:
        plain.use_channels_last()
        fused.use_channels_last()
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(9)).to(dev)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(backbone_module, "cudnn_conv_relu", counted(real[0]))
        mp.setattr(backbone_module, "cudnn_conv_add_relu", counted(real[1]))
        for amp, tol in ((False, 1e-4), (True, 3e-2)):
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
                ref = plain(x)
                torch.full((1 << 26,), float("nan"), device=dev)  # freed at once: NaN blocks
                got = fused(x)
            for p, f in zip(ref, got):
                assert f.dtype == p.dtype
                torch.testing.assert_close(f.float(), p.float(), rtol=tol,
                                           atol=tol * p.abs().max().item())
    finally:
        mp.undo()
        torch.backends.cudnn.allow_tf32 = tf32
    assert calls["n"] == 2 * (33 + 16)
