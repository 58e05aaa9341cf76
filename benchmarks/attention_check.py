"""flowtok's short-attention Triton kernel against SDPA on a GPU, over dtypes, batch sizes and every launch shape.

Each dtype runs in its own process with ``CUDA_LAUNCH_BLOCKING=1`` (16 then 512 sequences), so a launch that faults
names itself (the last line it printed) and the other dtype still runs. Prints one line per launch and writes a JSON of
them: max |kernel - SDPA|, finiteness, and for a fault the case and the error's last line.

    python benchmarks/attention_check.py --out results/attention_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = """
import json, sys, torch
import torch.nn.functional as F
from flowtok.nn import triton_ops as T
dtype, heads, n, head_dim = getattr(torch, sys.argv[1]), 16, 77, 72
d = heads * head_dim
torch.manual_seed(0)
for seqs, config in [(s, c) for s in (16, 512) for c in [*T.ATTENTION_CONFIGS, "picked"]]:
    qkv = (2 * torch.randn(seqs * n, 3 * d, device="cuda")).to(dtype)
    q, k, v = qkv.float().view(seqs, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(seqs * n, d)
    print(json.dumps({"dtype": sys.argv[1], "seqs": seqs, "config": config, "started": True}), flush=True)
    if config == "picked":
        out = T.short_attention(qkv, seqs, heads)
    else:
        out = torch.full((seqs * n, d), float("nan"), device="cuda", dtype=dtype)
        T._launch_attention(qkv, out, seqs, n, heads, head_dim, config)
    torch.cuda.synchronize()
    print(json.dumps({"dtype": sys.argv[1], "seqs": seqs, "config": config, "finite": bool(torch.isfinite(out).all()),
                      "max_abs_diff": float((out.float() - ref).abs().max())}), flush=True)
"""


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    rows: list[dict] = []
    for dtype in ("bfloat16", "float32"):
        proc = subprocess.run([sys.executable, "-c", CASE, dtype], env=env, capture_output=True, text=True,
                              timeout=300)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        rows += [r for r in lines if "started" not in r]
        if proc.returncode:
            last = lines[-1] if lines else {"dtype": dtype}
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({**{k: v for k, v in last.items() if k != "started"}, "fault": tail[:300]})
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
