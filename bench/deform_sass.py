"""What the Triton deformable-attention kernels compile to, without a GPU.

Triton compiles for a named GPU architecture on any machine (its ``ptxas`` and ``nvdisasm``
ship with it), so the machine code of both kernels can be read here: for each setting this
compiles the backward (and the forward) for ``--arch`` (90: H100/H200, 80: A100) and counts
the instructions that decide the backward's cost: the value-gradient atomics (``RED``: a
reduction whose result nobody waits for; ``ATOM``: an atomic that returns the old value), the
memory barriers and cache invalidations around them, the block barriers and shared-memory
traffic of layout conversions, the global loads, and the tensor-core instructions of the
merged rows (``_BWD_MERGE_FROM``).

    python bench/deform_sass.py [--arch 90] [--out sass.json]

Session 10 found this way that Triton's default memory order for ``tl.atomic_add``
(``acq_rel``) put a GPU-wide barrier (``MEMBAR.ALL.GPU``) before, and an L1 invalidation
(``CCTL.IVALL``) after, every one of the backward's 256 vector atomics per thread, and that
with a bfloat16 value map each atomic's tile went through shared memory first (a layout
conversion: 351 block barriers per program).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

# instruction families counted in the SASS (opcode prefix -> label)
FAMILIES = {
    ("RED", "REDG"): "reductions (RED)",
    ("ATOM", "ATOMG"): "atomics (ATOM)",
    ("MEMBAR",): "memory barriers (MEMBAR)",
    ("BAR",): "block barriers (BAR)",
    ("LDS", "STS"): "shared memory (LDS/STS)",
    ("CCTL",): "cache invalidations (CCTL)",
    ("LDG",): "global loads (LDG)",
    ("HMMA", "HGMMA"): "tensor-core (HMMA)",
}


def _signature(kind: str, dtype: str) -> dict[str, str]:
    # the attention weights come out of a softmax: float32 under autocast too
    common = {"value": f"*{dtype}", "shapes": "*i64", "starts": "*i64", "loc": "*fp32",
              "attw": "*fp32"}
    if kind == "fwd":
        return {**common, "out": f"*{dtype}", "S": "i32", "Q": "i32"}
    return {**common, "grad_out": f"*{dtype}", "grad_value": "*fp32", "grad_loc": "*fp32",
            "grad_attw": "*fp32", "S": "i32", "Q": "i32"}


def compile_kernel(kind: str, arch: int = 90, block_q: int = 64, warps: int = 4,
                   merge_from: int = 99, sem: str = "relaxed", head_dim: int = 32,
                   dtype: str = "bf16", vec: int = 4) -> Any:
    """The kernel ``kind`` ('fwd' or 'bwd') of :mod:`siamese_detr.ops.deform_attn_triton`
    compiled for ``sm_<arch>`` at a Deformable DETR size (8 heads, 4 levels, 4 points), with
    every pointer 16-byte aligned as PyTorch's allocations are. ``dtype``: of the value map
    and the output (bf16: under autocast; fp32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from siamese_detr.ops import deform_attn_triton as kernels

    sig = _signature(kind, dtype)
    bd, blp = kernels._block_sizes(head_dim, 4, 4)
    consts: dict[str, Any] = {"H": 8, "D": head_dim, "L": 4, "P": 4, "BQ": block_q, "BD": bd}
    if kind == "bwd":
        consts.update(BLP=blp, MERGE_FROM=merge_from, SEM=sem, VEC=vec)
    sig.update({name: "constexpr" for name in consts})
    pointers = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    fn = kernels._fwd_kernel if kind == "fwd" else kernels._bwd_kernel
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def sass_counts(compiled: Any) -> dict[str, int]:
    """Instruction counts per family (and per full opcode) in a compiled kernel's SASS."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    opcodes = Counter(m.group(1) for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?"
                                                      r"([A-Z][A-Z0-9_.x]+)", sass, re.M))
    counts = {label: sum(n for op, n in opcodes.items() if op.split(".")[0] in families)
              for families, label in FAMILIES.items()}
    counts["instructions"] = sum(opcodes.values())
    counts["opcodes"] = dict(opcodes)  # type: ignore[assignment]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    settings = [("fwd", {}), ("fwd", {"dtype": "fp32"}), ("bwd", {"sem": "acq_rel"}),
                ("bwd", {"sem": "relaxed"}), ("bwd", {"sem": "relaxed", "dtype": "fp32"}),
                ("bwd", {"sem": "relaxed", "merge_from": 2}),
                ("bwd", {"sem": "relaxed", "merge_from": 0})]
    print(f"sm_{args.arch}, 8 heads x 32 channels, 4 levels x 4 points, 64 queries and 4 warps "
          "per program; instructions in the SASS (static counts, not executions):")
    for kind, opts in settings:
        counts = sass_counts(compile_kernel(kind, args.arch, **opts))
        label = kind + "".join(f" {k}={v}" for k, v in opts.items())
        rows.append({"kernel": kind, **opts, **counts})
        print(f"  {label:32s} " + ", ".join(f"{v} {counts[v]}" for v in FAMILIES.values())
              + f", of {counts['instructions']}")
        atoms = {op: n for op, n in counts["opcodes"].items()  # type: ignore[union-attr]
                 if op.startswith(("RED", "ATOM", "MEMBAR", "CCTL"))}
        if atoms:
            print(f"  {'':32s} {atoms}")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
