"""flowtok's Triton GEMMs compiled for a GPU that is not here: shared memory, registers and spills of each launch.

Triton compiles for a named target without a device (``triton.compile`` with a ``GPUTarget``), and its bundled
``ptxas`` reports the registers and spills of the PTX. So on any machine this says, for
:func:`flowtok.nn.triton_ops.linear_gelu` and :func:`~flowtok.nn.triton_ops.linear_residual` at FlowTok-XL's shapes
(fc1: 1,152 -> 4,608; fc2: 4,608 -> 1,152) and each launch shape of ``benchmarks/gemm_epilogues.py``:

* whether the kernel compiles for the target (default ``sm_90``, an H100 / H200) and uses ``wgmma``;
* its shared memory (a pipelined main loop holds ``stages`` tiles of each operand), against the 227 KB an H100 /
  H200 block may use;
* its registers and spill bytes (``ptxas -v``): spills in the epilogue cost memory traffic on every tile;
* the blocks an SM can hold at once by those two (two let one block's epilogue overlap the other's main loop).

Pointers are declared 16-byte aligned, as the JIT specialises them for PyTorch's allocations.

    python benchmarks/kernel_compile.py                     # every launch, bf16 and e4m3, both epilogues
    python benchmarks/kernel_compile.py --out results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton  # type: ignore[import-untyped]
from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped]
from triton.compiler import ASTSource  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).parent))
from gemm_epilogues import LAUNCHES, LAUNCHES_FP8  # noqa: E402

from flowtok.nn import triton_ops  # noqa: E402

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100 / H200
SM_SHARED, SM_REGISTERS = 228 * 1024, 65536  # an H100 / H200 SM's shared memory and 32-bit registers


def compile_linear(dtype: str, launch: tuple[int, ...], residual: bool, tma: bool = True, arch: int = 90,
                   split: bool = triton_ops.LINEAR_SPLIT, schedule: str = "tiles", width: int = 1152,
                   hidden: int = 4608) -> dict[str, Any]:
    """Compile the GEMM of ``triton_ops`` for ``sm_{arch}``: ``dtype`` ``"bf16"`` or ``"fp8e4nv"`` (e4m3 operands
    with one scale each; the GELU epilogue then writes e4m3), the GELU epilogue (fc1: width -> hidden) or the
    gated residual one (fc2: hidden -> width, two CFG groups: two gate rows a tile), the epilogue in two column
    halves if ``split``, its tiles scheduled as ``schedule`` says (``triton_ops.LINEAR_SCHEDULES``; the persistent
    ones as 132 programs, an H100 SXM's / H200's SMs). Returns what the compiler and ptxas report."""
    fp8 = dtype == "fp8e4nv"
    block_m, block_n, block_k, group_m, warps, stages = launch
    n, k = (width, hidden) if residual else (hidden, width)
    persistent = schedule != "tiles"
    tma = tma or persistent
    kernel = (triton_ops._linear_persistent_kernel if persistent else
              triton_ops._linear_tma_kernel if tma else triton_ops._linear_kernel)
    operands = ({"a_desc": f"tensordesc<{dtype}[{block_m},{block_k}]>",
                 "w_desc": f"tensordesc<{dtype}[{block_n},{block_k}]>"} if tma
                else {"a_ptr": f"*{dtype}", "w_ptr": f"*{dtype}"})
    out = "*fp8e4nv" if fp8 and not residual else "*bf16"
    signature = {**operands, "bias_ptr": "*fp32" if fp8 else "*bf16", "x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "out_scale_ptr": "*fp32", "out_ptr": out, "gate_ptr": "*bf16", "gate_stride": "i32",
                 "rows_per_group": "i32", "m": "i32"}
    constants = dict(N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, HAS_BIAS=True,
                     X_SCALE=1 if fp8 else 0, W_SCALE=1 if fp8 else 0, QUANT=fp8 and not residual,
                     RESIDUAL=residual, GATE_ROWS=True, SPLIT=split, UPCAST=False)
    if persistent:
        constants.update(PROGRAMS=132, FLATTEN=schedule == "persistent", WARP_SPECIALIZE=schedule == "persistent-ws")
    aligned = [name for name, kind in signature.items() if kind.startswith("*")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in constants}},
                       constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    report = {"dtype": dtype, "launch": list(launch), "epilogue": "residual" if residual else "gelu",
              "loads": "tma" if tma else "ptr", "split": split, "schedule": schedule,
              "shared_bytes": compiled.metadata.shared,
              "shared_fits": compiled.metadata.shared <= SHARED_LIMIT, "wgmma": "wgmma" in ptx}
    report.update(ptxas_report(ptx, arch))
    if report["registers"]:  # blocks an SM can hold at once (registers allocated per warp in units of 256)
        per_warp = -(-report["registers"] * 32 // 256) * 256
        by_registers = SM_REGISTERS // (per_warp * warps)
        by_shared = SM_SHARED // max(1, compiled.metadata.shared + 1024)  # + the 1 KB the runtime reserves
        report["blocks_per_sm"] = min(by_registers, by_shared)
    return report


def ptxas_report(ptx: str, arch: int) -> dict[str, Any]:
    """Registers and spill bytes of ``ptx`` from ``ptxas -v``: the ptxas Triton itself assembles ``sm_{arch}`` with
    (its bundled one unless ``TRITON_PTXAS_PATH`` says otherwise; Triton 3.9 uses its newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas  # type: ignore[import-untyped]

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    text = proc.stdout + proc.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--loads", choices=("tma", "ptr", "both"), default="tma")
    p.add_argument("--split", choices=("default", "both"), default="default",
                   help="the epilogue as triton_ops.LINEAR_SPLIT says, or both in halves and whole")
    p.add_argument("--schedules", default="tiles", help="comma-separated triton_ops.LINEAR_SCHEDULES")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for dtype, launches in (("bf16", LAUNCHES), ("fp8e4nv", LAUNCHES_FP8)):
        for launch in launches:
            for residual in (False, True):
                for tma in {"tma": (True,), "ptr": (False,), "both": (True, False)}[args.loads]:
                    for split in (triton_ops.LINEAR_SPLIT,) if args.split == "default" else (True, False):
                        for schedule in args.schedules.split(","):
                            if schedule != "tiles" and not tma:
                                continue  # the persistent kernels load through TMA only
                            try:
                                row = compile_linear(dtype, launch, residual, tma, args.arch, split, schedule)
                            except Exception as exc:  # noqa: BLE001 - a launch that fails to compile is a result
                                row = {"dtype": dtype, "launch": list(launch), "loads": "tma" if tma else "ptr",
                                       "epilogue": "residual" if residual else "gelu", "split": split,
                                       "schedule": schedule, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "kernels": rows},
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()
