"""HungarianMatcher: batched equals per-image, brute-force optimum, empty targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from siamese_detr.matcher import HungarianMatcher
from siamese_detr.structures import BoxTargets


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy, wh], dim=1)


def _targets(sizes: list[int], num_classes: int, g: torch.Generator) -> list[BoxTargets]:
    return [BoxTargets(boxes=_random_boxes(n, g),
                       labels=torch.randint(0, num_classes, (n,), generator=g))
            for n in sizes]


def _giou_ref(a: list[float], b: list[float]) -> float:
    """Scalar GIoU of two cxcywh boxes, written out by hand."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _cost_ref(logits, boxes, tgt: BoxTargets, cls_loss: str, wc=2.0, wb=5.0, wg=2.0):
    """Scalar-loop cost matrix [Q][T] (independent of the vectorised implementation)."""
    Q, T = logits.shape[0], len(tgt)
    out = [[0.0] * T for _ in range(Q)]
    for q in range(Q):
        row = logits[q].tolist()
        for t in range(T):
            c = int(tgt.labels[t])
            if cls_loss == "ce":
                z = sum(math.exp(v) for v in row)
                cls = -math.exp(row[c]) / z
            else:
                p = 1 / (1 + math.exp(-row[c]))
                pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
                cls = pos - neg
            bq, bt = boxes[q].tolist(), tgt.boxes[t].tolist()
            l1 = sum(abs(x - y) for x, y in zip(bq, bt))
            out[q][t] = wc * cls + wb * l1 - wg * _giou_ref(bq, bt)
    return out


@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_matches_brute_force_optimum(cls_loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, cls_loss=cls_loss)
    Q, T, C = 5, 3, 4
    for _ in range(10):
        logits = torch.randn(1, Q, C, generator=g) * 2
        boxes = _random_boxes(Q, g)[None]
        tgt = _targets([T], C - 1, g)
        ((rows, cols),) = matcher(logits, boxes, tgt)
        cost = _cost_ref(logits[0], boxes[0], tgt[0], cls_loss)
        # brute force: every injective map target -> query
        best = min(itertools.permutations(range(Q), T),
                   key=lambda qs: sum(cost[q][t] for t, q in enumerate(qs)))
        best_cost = sum(cost[q][t] for t, q in enumerate(best))
        got_cost = sum(cost[int(q)][int(t)] for q, t in zip(rows, cols))
        assert got_cost == pytest.approx(best_cost, abs=1e-5)
        expected = sorted((q, t) for t, q in enumerate(best))
        assert list(zip(rows.tolist(), cols.tolist())) == expected
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert torch.all(rows[1:] > rows[:-1])  # sorted by prediction index


@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_batched_equals_per_image(cls_loss: str) -> None:
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(1.0, 5.0, 2.0, cls_loss=cls_loss)
    B, Q, C = 4, 7, 6
    logits = torch.randn(B, Q, C, generator=g)
    boxes = _random_boxes(B * Q, g).view(B, Q, 4)
    targets = _targets([3, 0, 7, 1], C - 1, g)
    batched = matcher(logits, boxes, targets)
    for i in range(B):
        ((r, c),) = matcher(logits[i : i + 1], boxes[i : i + 1], targets[i : i + 1])
        assert torch.equal(batched[i][0], r) and torch.equal(batched[i][1], c)
        assert len(r) == min(Q, len(targets[i]))
        assert sorted(c.tolist()) == list(range(len(targets[i])))


@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [4, 4, 4, 4]])  # padded / stacked
@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_cost_blocks_are_the_per_image_blocks_of_the_full_cost(cls_loss: str,
                                                               sizes: list[int]) -> None:
    """``cost_matrix`` computes (and the matching copies to the host) only each image's own
    block, ``[L, B, Q, max T_b]``: equal, bitwise, to the columns of that image in the cost
    of every prediction against every target of the batch (what it computed before)."""
    from siamese_detr.matcher import pairwise_cost

    g = torch.Generator().manual_seed(4)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, cls_loss=cls_loss)
    L, B, Q, C = 2, 4, 6, 5
    logits = torch.randn(L, B, Q, C, generator=g)
    boxes = _random_boxes(L * B * Q, g).view(L, B, Q, 4)
    targets = _targets(sizes, C, g)
    blocks = matcher.cost_matrix(logits, boxes, targets)
    assert blocks.shape == (L, B, Q, max(sizes))  # the most targets of one image, not all
    labels = torch.cat([t.labels for t in targets])
    full = pairwise_cost(logits.flatten(0, -2), boxes.flatten(0, -2), labels,
                         torch.cat([t.boxes for t in targets]), cost_class=2.0, cost_bbox=5.0,
                         cost_giou=2.0, cls_loss=cls_loss).view(L, B, Q, -1)
    start = 0
    for b, t in enumerate(targets):
        n = len(t)
        assert torch.equal(blocks[:, b, :, :n], full[:, b, :, start : start + n])
        start += n
    assert torch.isfinite(blocks).all()  # the padding columns too


def test_empty_targets() -> None:
    matcher = HungarianMatcher(1.0, 5.0, 2.0, cls_loss="ce")
    logits = torch.randn(2, 4, 3)
    boxes = _random_boxes(8, torch.Generator().manual_seed(2)).view(2, 4, 4)
    empty = [BoxTargets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))] * 2
    out = matcher(logits, boxes, empty)
    assert len(out) == 2
    for r, c in out:
        assert r.numel() == 0 and c.numel() == 0 and r.dtype == torch.int64


def test_obvious_assignment_and_more_targets_than_queries() -> None:
    # each target coincides with exactly one query: the matcher must pick it
    tboxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.1, 0.3]])
    perm = torch.tensor([2, 0, 1])  # query q holds target perm[q]
    boxes = tboxes[perm][None]
    tgt = [BoxTargets(boxes=tboxes, labels=torch.tensor([0, 1, 0]))]
    matcher = HungarianMatcher(1.0, 5.0, 2.0, cls_loss="focal")
    ((r, c),) = matcher(torch.zeros(1, 3, 2), boxes, tgt)
    assert r.tolist() == [0, 1, 2] and c.tolist() == perm.tolist()
    # 2 queries, 3 targets: only 2 matches
    ((r, c),) = matcher(torch.zeros(1, 2, 2), boxes[:, :2], tgt)
    assert r.tolist() == [0, 1] and c.tolist() == perm[:2].tolist()


def test_all_layers_and_jobs_in_one_transfer_match_each_block_alone() -> None:
    from scipy.optimize import linear_sum_assignment

    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.matcher import MatchJob, match_all, pairwise_cost

    g = torch.Generator().manual_seed(3)
    m = HungarianMatcher(cost_class=2.0, cls_loss="focal")
    jobs = []
    for sizes in ([2, 0, 3], [1, 4, 1]):
        L, B, Q = 3, len(sizes), 5
        jobs.append(MatchJob(m, torch.randn(L, B, Q, 4, generator=g),
                             _random_boxes(L * B * Q, g).view(L, B, Q, 4),
                             _targets(sizes, 4, g)))
    with OpCounter() as c:
        matchings, _ = match_all(jobs)
    assert c.syncs == 1
    # the per-image index tensors are made when read, not by every step (one from_numpy: the
    # flattened pairs' upload)
    assert c.op_names["lift_fresh"] + c.op_names["lift_fresh_copy"] <= 1
    assert len(matchings[0]) == 3 and matchings[0][-1] is matchings[0][2]
    assert [id(x) for x in matchings[0][1:]] == [id(matchings[0][1]), id(matchings[0][2])]
    assert matchings[0][::-1][0] is matchings[0][2] and matchings[0][5:] == []
    for job, matching in zip(jobs, matchings):
        starts = [0]
        for t in job.targets:
            starts.append(starts[-1] + len(t))
        flat = []
        for layer in range(3):
            for b, t in enumerate(job.targets):
                src, tgt = matching[layer][b]
                if len(t) == 0:
                    assert len(src) == 0
                    continue
                cost = pairwise_cost(job.logits[layer, b], job.boxes[layer, b], t.labels,
                                     t.boxes, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                     cls_loss="focal")
                rows, cols = linear_sum_assignment(cost.numpy())
                assert src.tolist() == rows.tolist() and tgt.tolist() == cols.tolist()
                flat += [(layer, b, int(s), int(j) + starts[b]) for s, j in zip(src, tgt)]
        L, N = matching.batch_idx.shape
        got = [(layer, int(matching.batch_idx[layer, n]), int(matching.pred_idx[layer, n]),
                int(matching.tgt_idx[layer, n])) for layer in range(L) for n in range(N)]
        assert sorted(got) == sorted(flat)


def test_a_cost_computed_by_the_caller_matches_like_the_matcher_s_own() -> None:
    """``MatchJob(cost=..., counts=...)``: the cost of ``HungarianMatcher.padded_cost`` (what
    Siamese DETR's dense part computes inside its graph, every image with ``T`` targets) gives
    the matching of the job that computes it from the targets."""
    from siamese_detr.matcher import MatchJob, match_all

    g = torch.Generator().manual_seed(5)
    m = HungarianMatcher()
    L, B, Q, T = 2, 3, 6, 4
    logits = torch.randn(L, B, Q, 2, generator=g)
    boxes = _random_boxes(L * B * Q, g).view(L, B, Q, 4)
    targets = _targets([T] * B, 1, g)
    cost = m.padded_cost(logits, boxes, torch.stack([t.labels for t in targets]),
                         torch.stack([t.boxes for t in targets]))
    (own, given), _ = match_all([MatchJob(m, logits, boxes, targets),
                                 MatchJob(m, logits, boxes, [], cost=cost, counts=[T] * B)])
    for name in ("batch_idx", "pred_idx", "tgt_idx"):
        assert torch.equal(getattr(own, name), getattr(given, name))
    assert [[(p.tolist(), t.tolist()) for p, t in layer] for layer in own] == \
        [[(p.tolist(), t.tolist()) for p, t in layer] for layer in given]


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 0], [5], [1, 4, 1, 0]])
def test_flat_pairs_are_the_per_image_pairs_in_batch_order(counts: list[int]) -> None:
    import numpy as np

    from siamese_detr.matcher import _flat_pairs

    rng = np.random.default_rng(len(counts) + sum(counts))
    L, Q = 3, 6
    layers = []
    for _ in range(L):
        per_image = []
        for t in counts:
            n = min(Q, t)
            per_image.append((np.sort(rng.choice(Q, n, replace=False)),
                              rng.permutation(t)[:n]))
        layers.append(per_image)
    got = _flat_pairs(layers, counts)
    starts = np.cumsum([0] + counts[:-1])
    want = [[(b, int(s), int(j) + int(starts[b])) for b, (src, tgt) in enumerate(per_image)
             for s, j in zip(src, tgt)] for per_image in layers]
    assert got.dtype == np.int64 and got.shape == (3, L, len(want[0]))
    for layer in range(L):
        assert [tuple(int(v) for v in got[:, layer, n]) for n in range(got.shape[2])] == \
            want[layer]
