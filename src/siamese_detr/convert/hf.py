"""Hugging Face ``transformers`` layout: our detector <-> ``DetrForObjectDetection``,
``ConditionalDetrForObjectDetection`` and ``DeformableDetrForObjectDetection`` directories.

The weights are written in the key names that the Hub checkpoints use (and that
``save_pretrained`` writes: it reverts the in-memory renames of transformers 5), e.g.
``model.encoder.layers.0.self_attn.out_proj.weight``, ``model.decoder.layers.0.fc1.weight``,
``model.backbone.conv_encoder.model.<resnet>``. The backbone is transformers' own ResNet
(``backbone_config.model_type = "resnet"``), which has torchvision's architecture (stride in
the 3x3 convolution, shortcut convolution where channels or stride change) and loads without
timm and without downloading anything. Reading also accepts the timm backbone naming of the
public checkpoints (``model.backbone.conv_encoder.model.layer1.0.conv1.weight``), which equals
torchvision's.

Pure functions on state dicts and plain dicts; ``transformers`` is only needed to check a
config (:func:`validate_config`) and by the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HF_ARCH",
    "HfError",
    "HfExport",
    "export_hf_dir",
    "id2label_from_categories",
    "model_card",
    "HfImport",
    "from_hf_state",
    "hf_config",
    "hf_preprocessor_config",
    "is_hf_dir",
    "model_overrides",
    "read_hf_dir",
    "to_hf_state",
    "unsupported_reason",
]

#: our variant -> (transformers model_type, architecture, image processor class)
HF_ARCH: dict[str, tuple[str, str, str]] = {
    "vanilla": ("detr", "DetrForObjectDetection", "DetrImageProcessor"),
    "conditional": ("conditional_detr", "ConditionalDetrForObjectDetection",
                    "ConditionalDetrImageProcessor"),
    "deformable": ("deformable_detr", "DeformableDetrForObjectDetection",
                   "DeformableDetrImageProcessor"),
}
VARIANT_OF_MODEL_TYPE = {mt: v for v, (mt, _, _) in HF_ARCH.items()}

_BB = "model.backbone.conv_encoder.model."
_RESNET = {  # depth -> (layer_type, depths per stage, stage widths, stem width)
    18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    34: ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
}


class HfError(ValueError):
    """A transformers directory or configuration that cannot be converted (one line)."""


# ----------------------------------------------------------------------------- key renames
@dataclass(frozen=True)
class _Rename:
    """``ours`` <-> ``hf`` key prefixes with integer fields ``{name}``; ``shift`` is added to
    a field going from ours to HF (ResNet stages/convs count from 1 in torchvision, 0 in HF)."""

    ours: str
    hf: str
    shift: tuple[tuple[str, int], ...] = ()

    def _regex(self, template: str) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", template)
        out = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)"
                      for i, p in enumerate(parts))
        return re.compile("^" + out)

    def apply(self, key: str, forward: bool) -> str | None:
        src, dst = (self.ours, self.hf) if forward else (self.hf, self.ours)
        m = self._regex(src).match(key)
        if m is None:
            return None
        sign = 1 if forward else -1
        fields = {k: int(v) + sign * dict(self.shift).get(k, 0) for k, v in m.groupdict().items()}
        return dst.format(**fields) + key[m.end():]


def _backbone_rules() -> list[_Rename]:
    b, s = "backbone.body.", (("s", -1), ("j", -1))
    hf_block = _BB + "encoder.stages.{s}.layers.{b}."
    return [
        _Rename(b + "conv1.", _BB + "embedder.embedder.convolution."),
        _Rename(b + "bn1.", _BB + "embedder.embedder.normalization."),
        _Rename(b + "layer{s}.{b}.conv{j}.", hf_block + "layer.{j}.convolution.", s),
        _Rename(b + "layer{s}.{b}.bn{j}.", hf_block + "layer.{j}.normalization.", s),
        _Rename(b + "layer{s}.{b}.downsample.0.", hf_block + "shortcut.convolution.", s[:1]),
        _Rename(b + "layer{s}.{b}.downsample.1.", hf_block + "shortcut.normalization.", s[:1]),
    ]


_TIMM_BACKBONE = _Rename("backbone.body.", _BB)  # timm ResNet names == torchvision's


def _ffn(ours: str, hf: str) -> list[_Rename]:
    return [_Rename(ours + "linear1.", hf + "fc1."), _Rename(ours + "linear2.", hf + "fc2.")]


def _rules(variant: str) -> list[_Rename]:
    enc, henc = "transformer.encoder.layers.{i}.", "model.encoder.layers.{i}."
    dec, hdec = "transformer.decoder.layers.{i}.", "model.decoder.layers.{i}."
    rules = _backbone_rules() + [
        _Rename("query_embed.", "model.query_position_embeddings."),
        # the same in every variant: encoder norms and FFNs, decoder self-attention output,
        # last norm and FFN (decoder norm1/norm2 swap roles between DETR and Deformable DETR)
        _Rename(enc + "norm1.", henc + "self_attn_layer_norm."),
        _Rename(enc + "norm2.", henc + "final_layer_norm."),
        *_ffn(enc, henc),
        _Rename(dec + "self_attn.out_proj.", hdec + "self_attn.out_proj."),
        _Rename(dec + "norm3.", hdec + "final_layer_norm."),
        *_ffn(dec, hdec),
    ]
    if variant in ("vanilla", "conditional"):
        rules += [
            _Rename("input_proj.", "model.input_projection."),
            _Rename(enc + "self_attn.out_proj.", henc + "self_attn.out_proj."),
            _Rename(dec + "norm1.", hdec + "self_attn_layer_norm."),
            _Rename(dec + "norm2.", hdec + "encoder_attn_layer_norm."),
            _Rename("transformer.decoder.norm.", "model.decoder.layernorm."),
            _Rename("class_embed.", "class_labels_classifier."),
            _Rename("bbox_embed.", "bbox_predictor."),
        ]
    if variant == "vanilla":
        rules += [_Rename(dec + "multihead_attn.out_proj.", hdec + "encoder_attn.out_proj.")]
    if variant == "conditional":
        rules += [
            _Rename(dec + "cross_attn.out_proj.", hdec + "encoder_attn.out_proj."),
            *[_Rename(dec + f"{p}_{n}_proj.", hdec + f"{p}_{n}_proj.")
              for p in ("sa", "ca") for n in ("qcontent", "qpos", "kcontent", "kpos", "v")],
            _Rename(dec + "ca_qpos_sine_proj.", hdec + "ca_qpos_sine_proj."),
            _Rename("transformer.decoder.query_scale.", "model.decoder.query_scale."),
            _Rename("transformer.decoder.ref_point_head.", "model.decoder.ref_point_head."),
        ]
    if variant == "deformable":
        rules += [
            _Rename("input_proj.", "model.input_proj."),
            _Rename("transformer.level_embed", "model.level_embed"),
            _Rename("transformer.reference_points.", "model.reference_points."),
            _Rename(enc + "self_attn.", henc + "self_attn."),
            _Rename(dec + "cross_attn.", hdec + "encoder_attn."),
            _Rename(dec + "norm1.", hdec + "encoder_attn_layer_norm."),
            _Rename(dec + "norm2.", hdec + "self_attn_layer_norm."),
            _Rename("class_embed.", "class_embed."),
        ]
    return rules


_IN_PROJ = re.compile(r"^(?P<pre>transformer\.(?:encoder|decoder)\.layers\.\d+\.)"
                      r"(?P<attn>self_attn|multihead_attn)\.in_proj_(?P<kind>weight|bias)$")
_QKV = re.compile(r"^(?P<pre>model\.(?:encoder|decoder)\.layers\.\d+\.)"
                  r"(?P<attn>self_attn|encoder_attn)\.(?P<qkv>[qkv])_proj\.(?P<kind>weight|bias)$")


def _rename(key: str, rules: list[_Rename], forward: bool) -> str | None:
    for rule in rules:
        out = rule.apply(key, forward)
        if out is not None:
            return out
    return None


# ----------------------------------------------------------------------------- config checks
def unsupported_reason(model: Mapping[str, Any], cls_loss: str) -> str | None:
    """Why transformers cannot represent this detector (None when it can).

    ``model``: our ``model`` config block as a dict; ``cls_loss``: the resolved loss
    ("ce" or "focal"): transformers' DETR head is softmax over ``num_labels + 1`` (no-object
    last), Conditional and Deformable DETR heads are sigmoid over ``num_labels``.
    """
    variant = model["variant"]
    depth = int(model["backbone"]["depth"])
    if depth not in _RESNET:
        return f"ResNet-{depth} has no transformers ResNet configuration"
    if variant == "vanilla" and cls_loss != "ce":
        return ("transformers' DetrForObjectDetection scores with a softmax over num_labels + 1 "
                "(last = no-object); this vanilla DETR was trained with the sigmoid focal loss "
                "(loss.cls_loss=focal)")
    if variant != "vanilla" and cls_loss != "focal":
        return (f"transformers' {HF_ARCH[variant][1]} scores with a sigmoid over num_labels "
                f"(focal loss); this {variant} DETR was trained with softmax cross-entropy "
                "(loss.cls_loss=ce), whose no-object column transformers cannot represent")
    return None


def _out_features(model: Mapping[str, Any]) -> list[str]:
    levels = int(model.get("num_feature_levels", 1))
    if model["variant"] != "deformable" or levels == 1:
        return ["stage4"]
    return ["stage3", "stage4"] if levels == 2 else ["stage2", "stage3", "stage4"]


def hf_config(model: Mapping[str, Any], id2label: Mapping[int, str]) -> dict[str, Any]:
    """``config.json`` contents for our ``model`` config block (a dict) and label names."""
    variant = model["variant"]
    model_type, arch, _ = HF_ARCH[variant]
    layer_type, depths, widths = _RESNET[int(model["backbone"]["depth"])]
    labels = {int(k): str(v) for k, v in id2label.items()}
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "backbone_config": {
            "model_type": "resnet", "layer_type": layer_type, "depths": depths,
            "hidden_sizes": widths, "embedding_size": 64, "num_channels": 3,
            "hidden_act": "relu", "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False, "out_features": _out_features(model),
        },
        # transformers 4.x reads these three; 5.x ignores them once backbone_config is set
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        "backbone": None,
        "num_channels": 3,
        "d_model": int(model["hidden_dim"]),
        "encoder_layers": int(model["enc_layers"]),
        "decoder_layers": int(model["dec_layers"]),
        "encoder_attention_heads": int(model["nheads"]),
        "decoder_attention_heads": int(model["nheads"]),
        "encoder_ffn_dim": int(model["dim_feedforward"]),
        "decoder_ffn_dim": int(model["dim_feedforward"]),
        "num_queries": int(model["num_queries"]),
        "dropout": float(model["dropout"]),
        "attention_dropout": float(model["dropout"]),
        "activation_dropout": float(model["dropout"]),
        "activation_function": "relu",
        "position_embedding_type": "sine",
        "dilation": False,
        # training-only in principle, but transformers 5.23's DETR decoder feeds the
        # layer-normed intermediate output to the next layer when it is on (not upstream)
        "auxiliary_loss": False,
        "id2label": {str(k): v for k, v in sorted(labels.items())},
        "label2id": {v: k for k, v in sorted(labels.items())},
    }
    if variant == "deformable":
        out.update(
            num_feature_levels=int(model["num_feature_levels"]),
            encoder_n_points=int(model["enc_n_points"]),
            decoder_n_points=int(model["dec_n_points"]),
            with_box_refine=bool(model["box_refine"]),
            two_stage=False,
        )
    return out


def hf_preprocessor_config(variant: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json``: our evaluation resize (shorter side ``val_size``, longer
    side at most ``max_size``), /255 rescale and ImageNet normalisation."""
    from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD

    return {
        "image_processor_type": HF_ARCH[variant][2],
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": int(data.get("val_size", 800)),
                 "longest_edge": int(data.get("max_size", 1333))},
        "resample": 2,  # PIL bilinear, as our resize
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_annotations": True,
        "do_pad": True,
    }


def validate_config(config: Mapping[str, Any]) -> None:
    """Build the transformers config class from ``config`` (raises on what it rejects)."""
    import transformers

    cls_name = {"detr": "DetrConfig", "conditional_detr": "ConditionalDetrConfig",
                "deformable_detr": "DeformableDetrConfig"}[config["model_type"]]
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    getattr(transformers, cls_name)(**kwargs)


# ----------------------------------------------------------------------------- export
def to_hf_state(state: Mapping[str, Tensor], model: Mapping[str, Any],
                with_class_head: bool = True) -> dict[str, Tensor]:
    """Our detector state dict (``backbone.body.*``, ``transformer.*``, heads) -> the
    transformers on-disk names of ``model["variant"]``. Raises :class:`HfError` on a key no
    rule maps (every tensor of the detector must land somewhere)."""
    variant = model["variant"]
    rules = _rules(variant)
    refine = variant == "deformable" and bool(model.get("box_refine", False))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # plain BatchNorm counter; transformers uses frozen batch norm
        if key.startswith("class_embed.") and not with_class_head:
            continue
        if key.startswith("transformer.decoder.bbox_embed."):
            continue  # the same modules as bbox_embed.* (box refinement)
        if variant == "deformable" and key.startswith(("class_embed.", "bbox_embed.")):
            layer, rest = key.split(".", 2)[1:]
            if not refine and layer != "0":
                continue  # one shared head; transformers ties class/bbox_embed.N to .0
            name = key.split(".")[0]
            out[f"{name}.{layer}.{rest}"] = value
            if refine and name == "bbox_embed":  # transformers also names them in the decoder
                out[f"model.decoder.bbox_embed.{layer}.{rest}"] = value
            continue
        m = _IN_PROJ.match(key)
        if m is not None:
            attn = "self_attn" if m["attn"] == "self_attn" else "encoder_attn"
            pre = "model." + m["pre"][len("transformer."):]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{pre}{attn}.{name}_proj.{m['kind']}"] = part
            continue
        new = _rename(key, rules, forward=True)
        if new is None:
            raise HfError(f"no transformers name for weight {key!r} ({variant} DETR)")
        out[new] = value
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_hf_state(hf_state: Mapping[str, Tensor], model: Mapping[str, Any]
                  ) -> tuple[dict[str, Tensor], list[str]]:
    """transformers on-disk names -> our detector state dict; returns ``(state, unmapped)``.

    Accepts transformers' ResNet and timm's ResNet backbone names. Deformable heads stored
    once (``class_embed.0`` with tied copies) are replicated to every decoder layer; with box
    refinement ``model.decoder.bbox_embed.N`` is read as ``bbox_embed.N``.
    """
    variant = model["variant"]
    rules = _rules(variant)
    layers = int(model["dec_layers"])
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        if variant == "deformable":
            if key.startswith("model.decoder.bbox_embed."):
                key = key[len("model.decoder."):]
                if key in hf_state:
                    continue  # both names present: the same heads
            if key.startswith(("class_embed.", "bbox_embed.")):
                out[key] = value
                continue
        m = _QKV.match(key)
        if m is not None:
            attn = m["attn"]
            if attn == "encoder_attn":
                attn = "multihead_attn"
            qkv.setdefault((m["pre"], attn, m["kind"]), {})[m["qkv"]] = value
            continue
        new = _rename(key, rules, forward=False)
        if new is None and key.startswith(_BB):
            new = _TIMM_BACKBONE.apply(key, forward=False)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    for (pre, attn, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped += [f"{pre}{attn}.{n}_proj.{kind}" for n in parts]
            continue
        ours = "transformer." + pre[len("model."):] + f"{attn}.in_proj_{kind}"
        out[ours] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if variant == "deformable":
        for name in ("class_embed", "bbox_embed"):
            first = {k[len(name) + 3:]: v for k, v in out.items() if k.startswith(f"{name}.0.")}
            for layer in range(1, layers):
                for rest, v in first.items():
                    out.setdefault(f"{name}.{layer}.{rest}", v.clone())
        if model.get("box_refine"):
            out.update({"transformer.decoder." + k: v for k, v in list(out.items())
                        if k.startswith("bbox_embed.")})
    return out, unmapped


# ----------------------------------------------------------------------------- import
@dataclass
class HfImport:
    """A transformers directory read back: our ``model`` config overrides, label names and
    the detector state dict in our names."""

    variant: str
    model: dict[str, Any]  # our model config block (variant, hidden_dim, ...)
    id2label: dict[int, str]
    state: dict[str, Tensor]
    unmapped: list[str]


def is_hf_dir(path: str | Path) -> bool:
    """True for a folder with a ``config.json`` (a transformers model directory)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _depth_of(backbone: Mapping[str, Any]) -> int:
    if backbone.get("model_type") == "timm_backbone" or "backbone" in backbone:
        name = str(backbone.get("backbone") or "resnet50")
        m = re.fullmatch(r"resnet(18|34|50)", name)
        if m is None:
            raise HfError(f"backbone {name!r} is not a ResNet-18/34/50 (only those map to ours)")
        return int(m[1])
    depths = list(backbone.get("depths", [3, 4, 6, 3]))
    layer_type = backbone.get("layer_type", "bottleneck")
    for depth, (lt, ds, _) in _RESNET.items():
        if lt == layer_type and ds == depths:
            return depth
    raise HfError(f"backbone ResNet {layer_type} {depths} is not ResNet-18/34/50")


def model_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``model`` config block (as a dict) described by a transformers ``config.json``.

    Raises :class:`HfError` for what our detector does not have (learned position
    embeddings, dilation, two-stage Deformable DETR, other backbones, unequal encoder and
    decoder widths or heads).
    """
    model_type = config.get("model_type")
    if model_type not in VARIANT_OF_MODEL_TYPE:
        raise HfError(f"model_type {model_type!r} is not one of "
                      f"{', '.join(VARIANT_OF_MODEL_TYPE)}")
    variant = VARIANT_OF_MODEL_TYPE[model_type]
    if config.get("position_embedding_type", "sine") != "sine":
        raise HfError("learned position embeddings are not supported (ours are sine)")
    if config.get("dilation"):
        raise HfError("dilated (DC5) backbones are not supported")
    if config.get("two_stage"):
        raise HfError("two-stage Deformable DETR is not supported")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(a, 8) != config.get(b, 8):
            raise HfError(f"{a} != {b}: our detector uses one value for both")
    backbone = config.get("backbone_config") or {"backbone": config.get("backbone")}
    num_labels = len(config.get("id2label") or {"0": "", "1": ""})
    defaults = {"detr": 100, "conditional_detr": 300, "deformable_detr": 300}
    ffn_default = 1024 if variant == "deformable" else 2048
    model: dict[str, Any] = {
        "variant": variant,
        "backbone": {"depth": _depth_of(backbone)},
        "num_classes": num_labels,
        "hidden_dim": int(config.get("d_model", 256)),
        "nheads": int(config.get("encoder_attention_heads", 8)),
        "enc_layers": int(config.get("encoder_layers", 6)),
        "dec_layers": int(config.get("decoder_layers", 6)),
        "dim_feedforward": int(config.get("encoder_ffn_dim", ffn_default)),
        "num_queries": int(config.get("num_queries", defaults[model_type])),
    }
    if variant == "deformable":
        model.update(
            num_feature_levels=int(config.get("num_feature_levels", 4)),
            enc_n_points=int(config.get("encoder_n_points", 4)),
            dec_n_points=int(config.get("decoder_n_points", 4)),
            box_refine=bool(config.get("with_box_refine", False)),
        )
        levels = _hf_backbone_levels(backbone, model["num_feature_levels"])
        ours = [5] if model["num_feature_levels"] == 1 else (
            [4, 5] if model["num_feature_levels"] == 2 else [3, 4, 5])
        if levels != ours:
            raise HfError(f"backbone levels C{levels} with num_feature_levels="
                          f"{model['num_feature_levels']}: ours uses C{ours}")
    return model


def _hf_backbone_levels(backbone: Mapping[str, Any], num_levels: int) -> list[int]:
    """ResNet levels (C2..C5 = 2..5) the transformers backbone returns."""
    if "out_features" in backbone and backbone["out_features"]:
        return [int(s.removeprefix("stage")) + 1 for s in backbone["out_features"]]
    if "out_indices" in backbone and backbone["out_indices"]:
        return [int(i) + 1 for i in backbone["out_indices"]]
    return [3, 4, 5] if num_levels > 1 else [5]


def _read_weights(folder: Path) -> dict[str, Tensor]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st), device="cpu")
        if pt.is_file():
            state = torch.load(pt, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                return state
            raise HfError(f"{pt} does not hold a state dict")
    except HfError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a file problem
        raise HfError(f"cannot read the weights in {folder} ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    raise HfError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin "
                  "(sharded checkpoints: merge them first)")


def read_hf_dir(path: str | Path) -> HfImport:
    """Read a transformers DETR / Conditional DETR / Deformable DETR directory (no
    transformers needed: ``config.json`` and the weights are read directly)."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HfError(f"{folder / 'config.json'} is not readable json ({exc})") from None
    model = model_overrides(config)
    hf_state = _read_weights(folder)
    state, unmapped = from_hf_state(hf_state, model)
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return HfImport(model["variant"], model, id2label, state, unmapped)


def id2label_from_categories(categories: list[Mapping[str, Any]] | None,
                             num_classes: int) -> dict[int, str]:
    """Label names for ``range(num_classes)`` (our labels are the COCO category ids); ids
    without a category are ``"N/A"`` as in the Hub's COCO checkpoints."""
    names = {int(c["id"]): str(c["name"]) for c in categories or []}
    return {i: names.get(i, "N/A" if names else f"LABEL_{i}") for i in range(num_classes)}



# ----------------------------------------------------------------------------- directory
@dataclass
class HfExport:
    """What :func:`export_hf_dir` wrote."""

    folder: Path
    architecture: str
    num_tensors: int
    class_head: bool  # False: pretraining checkpoint, class head left out
    notes: list[str]


def _licence_line(backbone: Mapping[str, Any]) -> str:
    weights = str(backbone.get("weights") or "")
    fmt = str(backbone.get("weights_format") or "auto")
    if fmt == "swav" or "swav" in weights.lower():
        return ("The ResNet backbone was initialised from SwAV (Caron et al. 2020, "
                "facebookresearch/swav), whose weights are released under **CC BY-NC 4.0** "
                "(non-commercial use only); this model inherits that restriction.")
    if weights:
        return (f"The ResNet backbone was initialised from `{Path(weights).name}`; check that "
                "file's licence before redistributing these weights.")
    return ("The ResNet backbone was trained from random initialisation in this run (no "
            "third-party weights).")


def model_card(source: Mapping[str, Any], config: Mapping[str, Any], class_head: bool) -> str:
    """README.md of an exported directory: method, data, recipe, backbone licence."""
    run = source["config"]
    model, optim = run.get("model", {}), run.get("optim", {})
    arch = config["architectures"][0]
    kind = source.get("kind", "finetune")
    pre = run.get("pretrain", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: object-detection",
        "tags: [object-detection, detr, siamese-detr]",
        "---",
        "",
        f"# {run.get('name', 'siamese-detr')} ({arch})",
        "",
        f"Exported by `siamese-detr export --to hf` from a **{kind}** checkpoint. Load it with "
        f"`transformers.{arch}.from_pretrained(DIR)` and the image processor in this folder.",
        "",
        "## Method",
        "",
    ]
    if kind == "pretrain":
        lines += [
            f"Self-supervised pretraining ({pre.get('method', 'siamese')}) of a "
            f"{model.get('variant')} DETR with a frozen backbone, on unlabeled images "
            f"(`{pre.get('images', '')}`). The pretext class head does not fit downstream "
            "classes and is **not included**: `from_pretrained` reports "
            "`class_labels_classifier`/`class_embed` as newly initialised; pass "
            "`num_labels=K` to fine-tune on K classes.",
        ]
    else:
        data = run.get("data", {})
        init = run.get("init") or "random initialisation (from scratch)"
        lines += [
            f"Supervised fine-tuning of a {model.get('variant')} DETR on COCO-format data "
            f"(train `{data.get('train_ann', '')}`, evaluated on `{data.get('val_ann', '')}`), "
            f"starting from `{init}`.",
        ]
    lines += [
        "",
        "## Recipe",
        "",
        f"- backbone: ResNet-{model.get('backbone', {}).get('depth')} with frozen batch norm "
        f"(freeze: {model.get('backbone', {}).get('freeze')})",
        f"- transformer: d_model {model.get('hidden_dim')}, {model.get('nheads')} heads, "
        f"{model.get('enc_layers')} encoder / {model.get('dec_layers')} decoder layers, "
        f"FFN {model.get('dim_feedforward')}, {model.get('num_queries')} queries",
        f"- optimiser: AdamW lr {optim.get('lr')}, backbone lr {optim.get('lr_backbone')}, "
        f"weight decay {optim.get('weight_decay')}, {optim.get('length')} {optim.get('unit')}s, "
        f"lr drops at {optim.get('lr_drops')}",
        f"- seed {run.get('seed')}; the full config is in the source run's `config.yaml`",
        "- `auxiliary_loss` is false in config.json: transformers 5.23's DETR decoder feeds the "
        "normalised intermediate output to the next layer when it is true, which changes "
        "inference; set it only for training",
        "",
        "## Labels",
        "",
        ("Label indices are the COCO category ids of the training json (`id2label`)."
         if class_head else "No class head (see Method)."),
        "",
        "## Licence of the weights",
        "",
        _licence_line(model.get("backbone", {})),
        "",
    ]
    return "\n".join(lines)


def export_hf_dir(source: Mapping[str, Any], out: str | Path, check: bool = True) -> HfExport:
    """Write a transformers directory for a :func:`~siamese_detr.convert.source.read_source`
    dict: ``config.json``, ``preprocessor_config.json``, ``model.safetensors``, ``README.md``.

    Raises :class:`HfError` for what transformers cannot represent (see
    :func:`unsupported_reason`).
    """
    from siamese_detr.config import LossConfig, resolved_cls_loss
    from siamese_detr.configio import from_dict
    from siamese_detr.convert.folder import safetensors_bytes
    from siamese_detr.files import write_bytes

    run = source["config"]
    cfg = from_dict({k: v for k, v in run.items() if k != "init"})
    model = run["model"]
    class_head = source.get("kind", "finetune") != "pretrain"
    loss = cfg.loss if class_head else LossConfig()
    reason = unsupported_reason(model, resolved_cls_loss(cfg.model, loss))
    if reason:
        raise HfError(f"transformers cannot represent this detector: {reason}")
    notes: list[str] = []
    if class_head:
        id2label = id2label_from_categories(source.get("categories"), cfg.model.num_classes)
        if not source.get("categories"):
            notes.append("the checkpoint stores no category names: labels are LABEL_<id>")
    else:
        id2label = {0: "object"}
        notes.append("pretraining checkpoint: the pretext class head is not exported; "
                     "from_pretrained initialises the class head (pass num_labels=K)")
    config = hf_config(model, id2label)
    if check:
        validate_config(config)
    state = to_hf_state(source["model"], model, with_class_head=class_head)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "model.safetensors", safetensors_bytes(state, {"format": "pt"}))
    write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    pre = hf_preprocessor_config(model["variant"], run.get("data", {}))
    write_bytes(folder / "preprocessor_config.json",
                       (json.dumps(pre, indent=2) + "\n").encode())
    write_bytes(folder / "README.md", model_card(source, config, class_head).encode())
    return HfExport(folder, config["architectures"][0], len(state), class_head, notes)
