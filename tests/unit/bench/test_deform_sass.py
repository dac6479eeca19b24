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
                for arch, sem in ((90, "relaxed"), (90, "acq_rel"), (80, "relaxed"))}
    except ImportError as e:  # Triton's compiler API moved
        pytest.skip(f"cannot compile for sm_90 with this Triton: {e}")


@pytest.mark.parametrize("arch", [90, 80])
def test_backward_value_gradient_adds_are_unfenced_reductions(sass, arch: int) -> None:
    """4 levels x 4 points x 4 corners = 64 adds of a [64 queries, 32 channels] float32 tile
    per program; 128 threads: 16 floats each, 4 per vector instruction on Hopper, one per
    instruction on Ampere (no vector atomics there)."""
    ops = sass[arch, "relaxed"]["opcodes"]
    reductions = {op: n for op, n in ops.items() if op.startswith("RED")}
    if arch == 90:
        assert reductions == {"REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU": 64 * 4}, reductions
    else:
        assert sum(reductions.values()) == 64 * 16 and all(".F32." in op for op in reductions)
    assert not any(op.startswith(("ATOM", "MEMBAR", "CCTL")) for op in ops), ops


def test_the_counter_sees_default_order_fences(sass) -> None:
    """The control: with Triton's default ``acq_rel`` order each add waits for its result,
    behind a GPU-wide barrier and an L1 invalidation."""
    ops = sass[90, "acq_rel"]["opcodes"]
    assert ops.get("ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU") == 256
    assert ops.get("MEMBAR.ALL.GPU") == 256 and ops.get("CCTL.IVALL") == 256
    assert sass[90, "acq_rel"]["reductions (RED)"] == 0
