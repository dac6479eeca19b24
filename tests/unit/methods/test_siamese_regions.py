"""Issue 14: every shared region is a real box in both views.

The region rules (official ``SiameseDETRDataset.clip_and_remove_out_box``): proposals are
clipped to the views' overlap (far sides at ``overlap - 1`` px), kept when their area is at
least ``area_min_ratio`` (5 %) of the overlap's and their corners are ordered; missing rows are
jittered copies (+-10 % of each side) clipped to the overlap. An affine map takes view 1 to
view 2, so the area ratio to the view's own overlap is the same in both views. A sweep over
600 samples with adversarial proposals (slivers along the overlap's sides, boxes outside it,
zero-width boxes) checks that no zero-width / zero-height region survives, and that the check
fails when a degenerate region is planted.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from siamese_detr.config import SiameseOptions
from siamese_detr.methods.siamese import views
from siamese_detr.methods.siamese.views import PAD_JITTER, ViewPlan, image_to_view, plan_views

OPTS = SiameseOptions(num_regions=5, base_scales=(96, 112, 128), base_max_size=160)
N_SAMPLES = 600
# a jittered copy keeps at least (1 - 2 * 0.1) of each side of the box it copies
PAD_SHRINK = (1.0 - 2 * PAD_JITTER) ** 2
_IMAGES = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8))
           for k, (w, h) in enumerate([(150, 120), (96, 160), (200, 90), (128, 128)])]


def _proposals(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Random boxes, many thin or partly outside any overlap, a few exactly degenerate."""
    n = int(rng.integers(1, 40))
    x0 = rng.uniform(-0.1, 1.0, n) * w
    y0 = rng.uniform(-0.1, 1.0, n) * h
    bw = rng.choice([0.0, 1.0, 3.0, 0.2 * w, 0.6 * w, 1.2 * w], n) * rng.uniform(0.5, 1.0, n)
    bh = rng.choice([0.0, 1.0, 3.0, 0.2 * h, 0.6 * h, 1.2 * h], n) * rng.uniform(0.5, 1.0, n)
    return np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.float32)


def _n_proposed(plan: ViewPlan, opts: SiameseOptions) -> int:
    """How many rows after row 0 are surviving proposals (the rest are jittered copies)."""
    c1, _ = views._proposal_candidates(plan.proposals, plan.geom, opts)
    return min(len(c1), opts.num_regions - 1)


def region_problems(plan: ViewPlan, opts: SiameseOptions = OPTS) -> list[str]:
    """Every way a region of ``plan`` is not a real box under the region rules."""
    problems = []
    g = plan.geom
    n_prop = _n_proposed(plan, opts)
    for name, boxes, rect in (("view 1", plan.boxes1, g.view1), ("view 2", plan.boxes2, g.view2)):
        ox0, oy0, ox1, oy1 = image_to_view(g.inter[None], rect, g.size)[0]
        min_area = opts.area_min_ratio * (ox1 - ox0) * (oy1 - oy0)
        w = boxes[:, 2].astype(np.float64) - boxes[:, 0]
        h = boxes[:, 3].astype(np.float64) - boxes[:, 1]
        for j in range(len(boxes)):
            if w[j] <= 0 or h[j] <= 0:
                problems.append(f"{name} region {j}: {w[j]:.3g} x {h[j]:.3g} px")
                continue
            floor = min_area if j <= n_prop else PAD_SHRINK * min_area
            if w[j] * h[j] < floor * (1 - 1e-4):
                problems.append(f"{name} region {j}: area {w[j] * h[j]:.3g} < {floor:.3g}")
            inside = (boxes[j, 0] >= ox0 - 1e-3 and boxes[j, 1] >= oy0 - 1e-3
                      and boxes[j, 2] <= ox1 + 1e-3 and boxes[j, 3] <= oy1 + 1e-3)
            if not inside:
                problems.append(f"{name} region {j}: outside the overlap")
    return problems


def _sweep(opts: SiameseOptions = OPTS) -> tuple[int, list[str]]:
    kept, problems = 0, []
    for k in range(N_SAMPLES):
        rng = np.random.default_rng([7, k])
        image = _IMAGES[k % len(_IMAGES)]
        plan = plan_views(image, _proposals(rng, *image.size), opts, rng)
        if plan is None:
            continue
        kept += 1
        problems += [f"sample {k}: {p}" for p in region_problems(plan, opts)]
    return kept, problems


def test_every_region_is_a_real_box_in_both_views() -> None:
    kept, problems = _sweep()
    assert kept >= N_SAMPLES // 2  # most samples keep at least one proposal
    assert problems == []


def test_the_check_fails_on_a_planted_degenerate_region(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Plant a zero-width region (first surviving proposal squashed to its left side) into
    the rule's output: the same sweep must flag it in every kept sample."""
    rule = views._proposal_candidates

    def planted(proposals, geom, opts):
        v1, v2 = rule(proposals, geom, opts)
        if len(v1):
            v1, v2 = v1.copy(), v2.copy()
            v1[0, 2], v2[0, 2] = v1[0, 0], v2[0, 0]
        return v1, v2

    monkeypatch.setattr(views, "_proposal_candidates", planted)
    kept, problems = _sweep()
    flagged = {p.split(":")[0] for p in problems if "region 1: 0 x" in p}
    assert kept > 0 and len(flagged) == kept


def test_the_area_rule_is_what_removes_degenerate_proposals() -> None:
    """Without the 5 % area rule the zero-width / zero-height proposals of the sweep survive
    (their corners are still ordered), so the sweep above tests the rule, not the data."""
    _, problems = _sweep(replace(OPTS, area_min_ratio=0.0))
    assert any(" x " in p for p in problems)
