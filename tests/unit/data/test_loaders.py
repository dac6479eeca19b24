"""InfiniteSampler and the exact-resume training loader."""

from __future__ import annotations

import random
from itertools import islice

import pytest
import torch

from siamese_detr.config import DataConfig
from siamese_detr.data.coco import CocoDetection
from siamese_detr.data.loaders import (
    InfiniteSampler,
    SeededSamples,
    build_detection_loader,
    build_eval_loader,
)
from siamese_detr.data.transforms import build_transforms
from siamese_detr.demo.synthetic import make_detection_set


def _take(sampler, n):
    return list(islice(iter(sampler), n))


def test_each_pass_is_a_permutation_and_passes_differ():
    size = 7
    stream = _take(InfiniteSampler(size, seed=3), 4 * size)
    passes = [stream[i * size : (i + 1) * size] for i in range(4)]
    for p in passes:
        assert sorted(p) == list(range(size))
    assert len({tuple(p) for p in passes}) > 1
    g = torch.Generator()
    g.manual_seed(3 + 2)  # pass 2 is randperm seeded with seed + pass index
    assert passes[2] == torch.randperm(size, generator=g).tolist()
    assert _take(InfiniteSampler(size, seed=3), 20) == stream[:20]  # deterministic
    assert _take(InfiniteSampler(size, seed=4), 4 * size) != stream
    assert _take(InfiniteSampler(size, shuffle=False), 10) == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_ranks_are_disjoint_and_cover_each_pass():
    size, world = 10, 3
    single = _take(InfiniteSampler(size, seed=1), 2 * size)
    per_rank = [len(range(r, size, world)) for r in range(world)]  # 4, 3, 3
    for p in range(2):
        perm = single[p * size : (p + 1) * size]
        chunks = []
        for r in range(world):
            stream = _take(InfiniteSampler(size, seed=1, rank=r, world_size=world),
                           2 * per_rank[r])
            chunk = stream[p * per_rank[r] : (p + 1) * per_rank[r]]
            assert chunk == perm[r::world]
            chunks.append(set(chunk))
        assert set().union(*chunks) == set(range(size))
        assert sum(len(c) for c in chunks) == size


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 3)])
@pytest.mark.parametrize("k", [0, 2, 3, 7, 11, 25])
def test_start_equals_tail_of_unskipped_stream(rank, world, k):
    full = _take(InfiniteSampler(10, seed=5, rank=rank, world_size=world), k + 30)
    resumed = _take(InfiniteSampler(10, seed=5, rank=rank, world_size=world, start=k), 30)
    assert resumed == full[k:]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError):
        InfiniteSampler(5, start=-1)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    paths = make_detection_set(tmp_path_factory.mktemp("toy"), 5, 0, (64, 80), seed=0)
    cfg = DataConfig(augment="detr", train_scales=(48, 56, 64), crop_scales=(50, 60),
                     crop_size=(30, 45), max_size=90)
    return CocoDetection(paths.train_images, paths.train_ann, build_transforms(cfg, True), 3)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (ba, ta), (bb, tb) in zip(a, b):
        assert torch.equal(ba.images, bb.images)
        assert torch.equal(ba.mask, bb.mask) and torch.equal(ba.sizes, bb.sizes)
        for x, y in zip(ta, tb):
            assert x.image_id == y.image_id
            assert torch.equal(x.boxes, y.boxes) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.size, y.size)


def test_resume_reproduces_batches_with_any_num_workers(train_set):
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    full = list(islice(build_detection_loader(train_set, 2, 0, seed=7), 6))
    # loading in the main process leaves the caller's RNG states untouched
    assert random.getstate() == py_state
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    # the augmentation is really random: sizes vary and a repeated image differs
    assert len({tuple(t.size.tolist()) for _, ts in full for t in ts}) > 2
    resumed0 = list(islice(build_detection_loader(train_set, 2, 0, seed=7, start_step=3), 3))
    _assert_same_batches(resumed0, full[3:])
    resumed2 = list(islice(build_detection_loader(train_set, 2, 2, seed=7, start_step=3), 3))
    _assert_same_batches(resumed2, full[3:])
    full2 = list(islice(build_detection_loader(train_set, 2, 2, seed=7), 6))
    _assert_same_batches(full2, full)
    other = list(islice(build_detection_loader(train_set, 2, 0, seed=8), 6))
    with pytest.raises(AssertionError):
        _assert_same_batches(other, full)


def test_same_image_gets_different_augmentation_at_other_positions(train_set):
    wrapped = SeededSamples(train_set, seed=0)
    outs = [wrapped[(0, pos)] for pos in range(8)]
    again = wrapped[(0, 3)]
    assert torch.equal(again[0], outs[3][0])
    assert len({(tuple(img.shape), tuple(t.boxes.flatten().tolist())) for img, t in outs}) > 3


class _KeyRecorder(torch.utils.data.Dataset):
    accepts_position = True

    def __len__(self):
        return 4

    def __getitem__(self, key):
        return key


def test_position_aware_dataset_gets_index_and_position():
    batches = build_detection_loader(_KeyRecorder(), 3, 0, seed=0, start_step=2,
                                     collate_fn=list)
    keys = [k for batch in islice(batches, 2) for k in batch]
    assert [pos for _, pos in keys] == list(range(6, 12))
    expected = list(islice(iter(InfiniteSampler(4, seed=0, start=6)), 6))
    assert [i for i, _ in keys] == expected


def test_eval_loader_shards_sequentially(train_set):
    seen = []
    for r in range(2):
        ids = [t.image_id for _, ts in build_eval_loader(train_set, 2, 0, rank=r, world_size=2)
               for t in ts]
        assert ids == [train_set.ids[i] for i in range(r, len(train_set), 2)]
        seen += ids
    assert sorted(seen) == sorted(train_set.ids)
