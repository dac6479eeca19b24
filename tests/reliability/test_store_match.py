"""Item 2: a proposal store built from other images is refused at start with one line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from siamese_detr.cli.main import main
from siamese_detr.presets import get_preset

from .conftest import last_line, write_images


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    from siamese_detr.proposals.generate import generate_proposals

    root = tmp_path_factory.mktemp("other")
    write_images(root / "big", 12, (100, 80), seed=3)
    generate_proposals(root / "big", root / "store", method="random", workers=1, chunk_size=8,
                       progress=False)
    return root


def _cfg(images, store):
    cfg = get_preset("tiny/vanilla/siamese")
    return replace(cfg, pretrain=replace(cfg.pretrain, images=str(images), proposals=replace(
        cfg.pretrain.proposals, store=str(store))))


def test_same_names_other_sizes_is_refused(other_store, tmp_path):
    from siamese_detr.errors import DataError
    from siamese_detr.methods.siamese.data import build_pretrain_dataset

    write_images(tmp_path / "small", 4, (64, 64), seed=4)  # img000..img003, also in the store
    with pytest.raises(DataError) as err:
        build_pretrain_dataset(_cfg(tmp_path / "small", other_store / "store"))
    msg = str(err.value)
    assert f"proposal store {other_store / 'store'} (built from {other_store / 'big'})" in msg
    assert "img000.png is 64x64, store says 100x80" in msg and "(+1 more)" in msg


def test_images_missing_from_the_store_are_refused(other_store, tmp_path, capsys):
    write_images(tmp_path / "imgs", 3, (100, 80), seed=4)
    (tmp_path / "imgs" / "img001.png").rename(tmp_path / "imgs" / "cat.png")
    (tmp_path / "imgs" / "img002.png").rename(tmp_path / "imgs" / "dog.png")
    rc = main(["pretrain", "--out", str(tmp_path / "run"), f"pretrain.images={tmp_path / 'imgs'}",
               f"pretrain.proposals.store={other_store / 'store'}", "engine.progress=false"])
    line = last_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"siamese-detr pretrain: error: proposal store "
                           f"{other_store / 'store'} (built from {other_store / 'big'}, 12 "
                           f"images) has no proposals for 2 of the 3 images of "
                           f"{tmp_path / 'imgs'} (e.g. cat.png, dog.png)"), line
    assert not (tmp_path / "run").exists()  # item 9: no empty run folder left behind


def test_a_subset_of_the_store_images_is_accepted(other_store, tmp_path):
    from siamese_detr.methods.siamese.data import build_pretrain_dataset

    write_images(tmp_path / "sub", 12, (100, 80), seed=3)
    for p in sorted((tmp_path / "sub").iterdir())[5:]:
        p.unlink()
    ds = build_pretrain_dataset(_cfg(tmp_path / "sub", other_store / "store"))
    assert len(ds) == 5


def test_size_mismatch_per_sample_is_skipped_with_its_reason(other_store, tmp_path):
    """The start check probes a few images; every sample is still checked when loaded."""
    from siamese_detr.methods.siamese.data import (
        PretrainDataset,
        SkippedSample,
        build_pretrain_dataset,
        collate_siamese,
    )

    write_images(tmp_path / "sub", 2, (100, 80), seed=3)
    ds = build_pretrain_dataset(_cfg(tmp_path / "sub", other_store / "store"))
    assert isinstance(ds, PretrainDataset)
    write_images(tmp_path / "sub", 1, (64, 64), seed=9)  # img000 replaced after the start
    sample = ds[0]
    assert isinstance(sample, SkippedSample)
    assert sample.reason == "image size differs from the proposal store"
    batch = collate_siamese([sample, ds[1]])
    assert batch.skip_reasons == {"image size differs from the proposal store": 1}
    assert len(batch) == 1
