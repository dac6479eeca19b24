from dataclasses import replace

import pytest

from siamese_detr.cli.main import main
from siamese_detr.config import ConfigError, RunConfig
from siamese_detr.configio import (
    apply_overrides,
    diff,
    dump_yaml,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from siamese_detr.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_dict_and_yaml(name, tmp_path):
    cfg = get_preset(name)
    assert from_dict(to_dict(cfg)) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed_by_annotation():
    cfg = apply_overrides(RunConfig(), [
        "optim.lr=3e-4", "model.num_queries=300", "engine.tensorboard=true",
        "data.train_scales=480,512", "data.crop_size=[300,500]", "model.variant=deformable",
        "model.num_feature_levels=4",
    ])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.num_queries == 300 and isinstance(cfg.model.num_queries, int)
    assert cfg.engine.tensorboard is True
    assert cfg.data.train_scales == (480, 512)
    assert cfg.data.crop_size == (300, 500)
    assert cfg.model.num_feature_levels == 4


@pytest.mark.parametrize(("pair", "needle"), [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("model.hiden_dim=8", "did you mean 'model.hidden_dim'"),
    ("model.num_queries=abc", "must be an integer"),
    ("engine.tensorboard=maybe", "true or false"),
    ("model.variant=yolo", "is not one of"),
    ("noequals", "key.sub=value"),
])
def test_bad_overrides_name_the_key(pair, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(RunConfig(), [pair])


def test_impossible_combinations_are_rejected():
    with pytest.raises(ConfigError, match="needs model.variant=deformable"):
        apply_overrides(RunConfig(), ["model.num_feature_levels=4"])
    with pytest.raises(ConfigError, match="freeze=all"):
        apply_overrides(RunConfig(), ["task=pretrain"])


def test_diff_lists_exactly_the_changed_leaves():
    a = RunConfig()
    b = replace(a, seed=7, optim=replace(a.optim, lr=1.0))
    assert sorted(k for k, _, _ in diff(a, b)) == ["optim.lr", "seed"]


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'tiny/conditional/finetune'"):
        get_preset("tiny/conditonal/finetune")


def test_cli_config_typo_is_one_line_exit_2(capsys):
    assert main(["finetune", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'optim.lr'" in err[0]


def test_cli_config_show_is_valid_yaml(capsys):
    assert main(["config", "show", "siamese/conditional-100q/in1k", "optim.lr=5e-5"]) == 0
    text = capsys.readouterr().out
    import yaml

    cfg = from_dict(yaml.safe_load(text))
    assert cfg.optim.lr == pytest.approx(5e-5) and cfg.optim.length == 300_000
    assert cfg == apply_overrides(get_preset("siamese/conditional-100q/in1k"), ["optim.lr=5e-5"])
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_paper_pretraining_recipes_match_official_configs():
    c = get_preset("siamese/conditional-100q/in1k")
    assert (c.optim.length, c.optim.lr_drops, c.optim.lr, c.optim.weight_decay) == (
        300_000, (200_000,), 1e-4, 1e-4)
    assert (c.pretrain.siamese.weight_global, c.pretrain.siamese.weight_region) == (10.0, 5.0)
    assert c.model.num_queries == 100 and c.model.backbone.freeze == "all"
    d = get_preset("siamese/deformable-ms-300q/in1k")
    assert (d.model.num_queries, d.model.num_feature_levels, d.pretrain.batch_size) == (300, 4, 4)
    assert d.pretrain.siamese.weight_region == 3.0
    coco = get_preset("siamese/conditional-100q/coco")
    assert (coco.optim.length, coco.optim.lr_drops) == (120_000, (80_000,))
    assert (coco.pretrain.siamese.weight_global, coco.pretrain.siamese.weight_region) == (0.3, 3.0)
    assert coco.pretrain.siamese.base_scales == tuple(range(480, 801, 32))


def test_cli_overrides_may_be_interleaved_with_options(monkeypatch):
    import siamese_detr.cli.finetune as ft

    seen = {}

    def fake_run(args):
        seen["cfg"] = ft.config_from_args(args, "finetune")
        return 0

    monkeypatch.setattr(ft, "run", fake_run)
    from siamese_detr.cli import main as cli_main

    parser_args = ["finetune", "optim.lr=1e-3", "--out", "somewhere", "--preset",
                   "tiny/vanilla/finetune", "model.num_queries=10"]
    monkeypatch.setattr(cli_main, "build_parser", _parser_with(ft, fake_run))
    assert cli_main.main(parser_args) == 0
    cfg = seen["cfg"]
    assert (cfg.optim.lr, cfg.model.num_queries, cfg.output_dir) == (1e-3, 10, "somewhere")
    assert cfg.model.variant == "vanilla"


def _parser_with(module, func):
    import argparse

    def build():
        p = argparse.ArgumentParser(prog="siamese-detr")
        sub = p.add_subparsers(dest="command")
        module.register(sub)
        sub.choices["finetune"].set_defaults(func=func)
        return p
    return build


def test_cli_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--no-such-flag"])
    assert exc.value.code == 2
