"""The Triton deformable-attention backward compiled for Hopper (sm_90) on this CPU, read as
machine code (``bench/deform_sass.py``): its value-gradient adds are fire-and-forget vector
reductions with no memory barrier or cache invalidation around them. Triton's default memory
order for ``tl.atomic_add`` puts a GPU-wide barrier and an L1 invalidation before each."""

from __future__ import annotations

from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
    pytest.skip("this Triton ships no nvdisasm", allow_module_level=True)


@pytest.fixture(scope="module")
def sass(load_bench):
    module = load_bench("deform_sass")
    try:
        return {(arch, sem): module.sass_counts(module.compile_kernel("bwd", arch, sem=sem))
                for arch, sem in ((90, "relaxed"), (90, "acq_rel"))}
    except ImportError as e:  # Triton's compiler API moved
        pytest.skip(f"cannot compile for sm_90 with this Triton: {e}")


def test_backward_value_gradient_adds_are_unfenced_reductions(sass) -> None:
    """4 levels x 4 points x 4 corners = 64 adds of a [64 queries, 32 channels] float32 tile
    per program; 128 threads: 16 floats each, 4 per vector instruction."""
    ops = sass[90, "relaxed"]["opcodes"]
    reductions = {op: n for op, n in ops.items() if op.startswith("RED")}
    assert reductions == {"REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU": 64 * 4}, reductions
    assert not any(op.startswith(("ATOM", "MEMBAR", "CCTL")) for op in ops), ops


def test_backward_moves_no_tile_through_shared_memory(sass) -> None:
    """All of the backward's tiles share the atomics' layout: no layout conversion, so no
    shared-memory store/load and no block-wide barrier (351 barriers and 512 shared-memory
    round trips per program before session 10, when a bfloat16 value map's loads took 8
    elements per thread and the atomics 4). Value rows load 8 bytes at a time, the locations
    and weights as whole rows."""
    ops = sass[90, "relaxed"]["opcodes"]
    assert not any(op.startswith(("BAR", "LDS", "STS")) for op in ops), ops
    assert ops.get("LDG.E.64") == 64 * 4 + 4  # 4 rows per thread: 64 corners, grad_out
    # the gradients of the locations and of the weights: a row each per query, 4 queries per
    # thread, one 16-byte store each
    assert ops.get("STG.E.128") == 2 * 4


def test_the_counter_sees_default_order_fences(sass) -> None:
    """The control: with Triton's default ``acq_rel`` order each add waits for its result,
    behind a GPU-wide barrier and an L1 invalidation."""
    ops = sass[90, "acq_rel"]["opcodes"]
    assert ops.get("ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU") == 256
    assert ops.get("MEMBAR.ALL.GPU") == 256 and ops.get("CCTL.IVALL") == 256
    assert sass[90, "acq_rel"]["reductions (RED)"] == 0
