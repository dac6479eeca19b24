"""``bench_deform_bwd.atomic_rows``: the value-gradient rows the Triton backward adds, and
what merging a program's rows of one pixel would leave (the figures in docs/benchmarks.md)."""

from __future__ import annotations

import torch


def test_rows_of_identical_points_merge_per_program(load_bench) -> None:
    rows = load_bench("bench_deform_bwd").atomic_rows
    # one 2x2 level, 4 queries, 2 heads, 1 point each, all at the centre of pixel (0, 0):
    # x = 0.25 * 2 - 0.5 = 0, so the four corners (0..1, 0..1) are all on the map
    loc = torch.full((1, 4, 2, 1, 1, 2), 0.25)
    shapes = torch.tensor([[2, 2]])
    for block_q, left in ((1, 1.0), (2, 0.5), (4, 0.25)):
        (r,) = rows(loc, shapes, block_q)
        assert r["rows"] == 4 * 2 * 4  # queries x heads x corners
        assert r["merged_rows"] == 4 * 2 * 4 * left and r["left"] == left


def test_rows_off_the_map_are_not_added(load_bench) -> None:
    rows = load_bench("bench_deform_bwd").atomic_rows
    loc = torch.tensor([0.25, 0.25]).repeat(1, 3, 1, 1, 1, 1)  # [1, 3, 1, 1, 1, 2]
    loc[0, 1, ..., 0] = 1.5  # x = 2.5: both columns off a 2-wide map
    loc[0, 2, ..., 0] = 1.0  # x = 1.5: column 1 on the map, column 2 off
    (r,) = rows(loc, torch.tensor([[2, 2]]), 1)
    assert r["rows"] == 4 + 0 + 2
