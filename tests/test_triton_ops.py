"""flowtok.nn.triton_ops's kernels, and the fused DiT path through them, run by Triton's CPU interpreter.

Triton decides at import whether its kernels are interpreted (``TRITON_INTERPRET=1``), so each check runs in a
fresh interpreter with that variable set; the rest of the suite keeps the PyTorch path. The interpreter rounds
fp32 -> bf16 by truncation where a GPU rounds to nearest, so bf16 results are held to one bf16 step; fp32 ones
to fp32 rounding. On the GPU the same kernels are checked against fp32 by benchmarks/fast_inference.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton ships Linux wheels only")


# A tiny flow whose adaLN shifts, scales and gates are not zero, for the interpreted snippets (prepended to them).
_LIVE_TINY_FLOW = """
import torch
from flowtok.flow import FLOW_PRESETS, FlowTransformer

def live_tiny_flow():
    torch.manual_seed(0)
    model = FlowTransformer(FLOW_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model
"""


# Triton 3.6's interpreter turns a loop bound that is a kernel argument or a program id into a Python int through
# int() of a one-element array, which NumPy 2 refuses; the persistent GEMM loops over such bounds. Prepended to the
# snippets: the same conversion through the array's one element.
_INTERPRETER_LOOP_BOUNDS = """
import numpy as _np
import triton.runtime.interpreter as _interpreter

_patch_tensor = _interpreter._patch_lang_tensor

def _patch_lang_tensor(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(_np.asarray(self.handle.data).reshape(-1)[0]))

_interpreter._patch_lang_tensor = _patch_lang_tensor
"""


def _interpreted(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLOWTOK_TRITON": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_LOOP_BOUNDS + _LIVE_TINY_FLOW + textwrap.dedent(code)],
                          env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_layer_norm_modulate_kernel_matches_pytorch():
    _interpreted("""
        import torch
        import torch.nn.functional as F
        from flowtok.nn import triton_ops as T

        assert T.available(torch.zeros(1))
        torch.manual_seed(0)
        # widths of a power of two and not (a main part and a tail: 96 = 64 + 32, 40 = 32 + 8 of a 16-wide tail,
        # 1152 = 1024 + 128), rows not a multiple of the rows per program, one to three groups
        for groups, rows, d in [(2, 37, 96), (1, 5, 40), (3, 11, 1152), (2, 3, 64)]:
            x = 3 * torch.randn(groups, rows, d) + 1
            pending = torch.randn(groups, 1, d)
            shift, scale = torch.randn(groups, 1, 4 * d)[..., d:3 * d].chunk(2, dim=-1)  # strided adaLN rows
            ref = F.layer_norm(x + pending, (d,), eps=1e-6) * (1 + scale) + shift
            out = T.add_layer_norm_modulate(x, pending, shift, scale, 1e-6)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            plain = T.add_layer_norm_modulate(x, pending[:, 0], None, None, 1e-6)  # [G, D] rows, no modulation
            torch.testing.assert_close(plain, F.layer_norm(x + pending, (d,), eps=1e-6), rtol=1e-5, atol=1e-5)
            half = T.add_layer_norm_modulate(x.bfloat16(), pending.bfloat16(), shift.bfloat16(),
                                             scale.bfloat16(), 1e-6)
            ref16 = (F.layer_norm(x.bfloat16().float() + pending.bfloat16().float(), (d,), eps=1e-6)
                     * (1 + scale.bfloat16().float()) + shift.bfloat16().float())
            assert half.dtype == torch.bfloat16
            assert ((half.float() - ref16).abs() <= ref16.abs() * 2 ** -7 + 1e-6).all()
        print("OK")
    """)


def test_fold_gate_kernel_folds_each_groups_gate_and_moves_the_bias():
    _interpreted("""
        import torch
        from flowtok.nn import triton_ops as T

        torch.manual_seed(0)
        for groups, n_out, n_in, has_bias in [(2, 50, 70, True), (1, 33, 129, False), (3, 64, 128, True)]:
            w, bias = torch.randn(n_out, n_in), torch.randn(n_out) if has_bias else None
            gate = torch.randn(groups, 3 * n_out)[:, n_out:2 * n_out]  # a chunk of the adaLN output: strided
            pending = torch.randn(groups, 1, n_out)
            out, after = T.fold_gate(w, bias, gate, pending)
            assert out.shape == (groups, n_out, n_in) and after.shape == (groups, 1, n_out)
            assert torch.equal(out, w.unsqueeze(0) * gate.unsqueeze(2))
            expected = pending + (gate * bias).unsqueeze(1) if has_bias else pending
            torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
        try:
            T.fold_gate(torch.zeros(4, 4), None, torch.zeros(2, 5), torch.zeros(2, 1, 5))
        except ValueError as exc:
            assert "rows" in str(exc)
        else:
            raise AssertionError("a gate of the wrong length was accepted")
        print("OK")
    """)


def test_fused_flow_through_the_kernels_equals_the_plain_blocks():
    """With the default epilogues ("auto": cuBLAS for plain Linears) the LayerNorm and fold kernels run and
    flowtok's GEMM does not; with gemm_epilogues="triton" fc1 and its GELU run in it, once a block."""
    _interpreted("""
        import torch
        from flowtok.flow import FLOW_PRESETS, FlowTransformer
        from flowtok.nn import fused_dit, triton_ops

        model = live_tiny_flow()
        calls = []
        for name in ("add_layer_norm_modulate", "fold_gate", "linear_gelu"):
            fn = getattr(triton_ops, name)
            setattr(triton_ops, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
        x, t = torch.randn(6, 8, 4), torch.tensor(0.37)
        with torch.no_grad():
            ref = model(x, t.expand(6), torch.tensor([0, 0, 0, 1, 1, 1]))
            model.enable_fused_inference(min_rows=0)
            out = model.forward_grouped(x, t, (0, 1))
            depth = model.config.depth
            assert calls.count("add_layer_norm_modulate") == 2 * depth + 1 and calls.count("fold_gate") == 2 * depth
            assert "linear_gelu" not in calls
            assert ref.abs().max() > 0.5
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            calls.clear()
            model.enable_fused_inference(min_rows=0, gemm_epilogues="triton")
            out = model.forward_grouped(x, t, (0, 1))
        assert calls.count("linear_gelu") == depth
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        print("OK")
    """)


def test_layer_norm_kernel_writes_the_fp8_input_of_the_next_gemm():
    """Static and per-row e4m3 output, against the PyTorch quantisers. The kernel rounds to the e4m3 grid itself
    (the interpreter's own cast truncates), so the bytes are PyTorch's up to the LayerNorm's fp32 rounding: an
    element may sit one e4m3 step away where y / scale lies within that rounding of a tie."""
    _interpreted("""
        import torch
        import torch.nn.functional as F
        from flowtok.nn import triton_ops as T
        from flowtok.nn.fp8 import E4M3_MAX, quantize_rows, to_e4m3

        def check(q, ref):
            q, ref = q.float(), ref.float()
            step = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp(min=2 ** -6))) - 3)
            assert ((q - ref).abs() <= step).all()
            assert float((q == ref).float().mean()) > 0.999, float((q == ref).float().mean())

        assert T.available_fp8(torch.zeros(1))
        torch.manual_seed(0)
        for groups, rows, d in [(2, 37, 96), (1, 5, 40), (3, 11, 1152)]:
            x = 3 * torch.randn(groups, rows, d) + 1
            pending = torch.randn(groups, 1, d)
            shift, scale = torch.randn(groups, 1, 4 * d)[..., d:3 * d].chunk(2, dim=-1)
            y = F.layer_norm(x + pending, (d,), eps=1e-6) * (1 + scale) + shift
            static = torch.tensor(float(y.abs().amax()) / 2 / E4M3_MAX)  # half the range: some values saturate
            q, s = T.add_layer_norm_modulate_fp8(x, pending, shift, scale, 1e-6, static)
            assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and float(s) == float(static)
            assert float(q.float().abs().max()) == E4M3_MAX
            check(q, to_e4m3(y, static))
            q, s = T.add_layer_norm_modulate_fp8(x, pending, shift, scale, 1e-6, None)
            ref_q, ref_s = quantize_rows(y.reshape(-1, d))
            assert s.shape == (groups * rows, 1)
            torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
            check(q.reshape(-1, d), ref_q)
        print("OK")
    """)


def test_fused_fp8_flow_through_the_kernels_is_close_to_the_plain_fp8_blocks():
    _interpreted("""
        import torch
        from flowtok.flow import FLOW_PRESETS, FlowTransformer
        from flowtok.nn import triton_ops

        model = live_tiny_flow()
        x, t = torch.randn(6, 8, 4), torch.tensor(0.37)
        rel = lambda a, b: float((a - b).norm() / b.norm())
        with torch.no_grad():
            ref = model(x, t.expand(6), torch.tensor([0, 0, 0, 1, 1, 1]))
            model.quantize_fp8(emulate=True, calibrate=lambda: model(x, t.expand(6), torch.tensor([0] * 6)))
            plain = model(x, t.expand(6), torch.tensor([0, 0, 0, 1, 1, 1]))
            calls = []
            fn = triton_ops.add_layer_norm_modulate_fp8
            triton_ops.add_layer_norm_modulate_fp8 = lambda *a: calls.append(1) or fn(*a)
            model.enable_fused_inference(min_rows=0, gemm_epilogues="pytorch")  # the FP8 GEMMs of PyTorch
            out = model.forward_grouped(x, t, (0, 1))
        assert len(calls) == 2 * model.config.depth  # qkv's and fc1's inputs came out of the kernel in e4m3
        assert rel(out, plain) < 0.1 * rel(plain, ref), (rel(out, plain), rel(plain, ref))
        print("OK")
    """)


def test_the_e4m3_rounding_matches_pytorchs_cast_on_ties_subnormals_and_the_range_end():
    _interpreted("""
        import torch
        import triton
        import triton.language as tl
        from flowtok.nn import triton_ops as T

        @triton.jit
        def grid_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            tl.store(y_ptr + offs, T._e4m3_grid(v), mask=offs < n)

        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[grid.isfinite()].unique()
        mids = (grid[1:] + grid[:-1]) / 2  # exact ties between neighbours: to even
        near = torch.cat([mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
        x = torch.cat([grid, mids, near, torch.tensor([0.0, -0.0, 2 ** -10, 2 ** -9 * 0.5]),
                       torch.empty(10000).uniform_(-448, 448), torch.randn(10000) * 0.01])
        y = torch.empty_like(x)
        grid_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        ref = x.to(torch.float8_e4m3fn).float()
        bad = y != ref
        assert not bad.any(), torch.stack([x[bad], y[bad], ref[bad]], 1)[:8]
        print("OK")
    """)


def test_the_gpu_runs_kernel_check_passes_under_the_interpreter():
    """benchmarks/fast_fp8.py's byte check of the e4m3 LayerNorm kernel, which a GPU run starts with."""
    bench = str(Path(__file__).parents[1] / "benchmarks")
    _interpreted(f"""
        import sys
        sys.path.insert(0, {bench!r})
        import fast_fp8

        out = fast_fp8.check_kernel(torch.device("cpu"), torch.bfloat16, 96, rows=200)
        assert out["pass"] and out["static"]["max_steps"] <= 1 and out["rows"]["scale_rel_err"] < 1e-5, out
        print("OK")
    """)


def test_linear_gelu_kernel_equals_linear_then_tanh_gelu():
    """Rows, columns and depth that are and are not multiples of the tiles; with and without bias; bf16 to one
    bf16 step (the interpreter truncates); the GELU's tails: -0 far below zero, x far above."""
    _interpreted("""
        import torch
        import torch.nn.functional as F
        from flowtok.nn import triton_ops as T

        torch.manual_seed(0)
        for m, k, n, has_bias, launch in [(100, 64, 96, True, (32, 32, 16, 2, 4, 1)),
                                          (37, 40, 50, False, (16, 32, 16, 4, 4, 1)),
                                          (300, 128, 64, True, None)]:
            x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
            bias = torch.randn(n) if has_bias else None
            for tma, split in [(False, True), (True, True), (True, False)]:  # pointer or TMA loads; the epilogue
                T.LINEAR_SPLIT = split                                     # in column halves or whole
                out = T.linear_gelu(x, w, bias, launch, tma=tma)
                assert out.shape == (m, n) and out.dtype == torch.float32
                torch.testing.assert_close(out, F.gelu(F.linear(x, w, bias), approximate="tanh"), rtol=1e-5,
                                           atol=1e-5)
            x16, w16 = x.bfloat16(), w.bfloat16()
            b16 = bias.bfloat16() if bias is not None else None
            half = T.linear_gelu(x16, w16, b16, launch, tma=True)
            ref = F.gelu(F.linear(x16.float(), w16.float(), b16.float() if b16 is not None else None),
                         approximate="tanh")
            assert half.dtype == torch.bfloat16
            assert ((half.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-5).all()
        x, w = torch.randn(100, 64), torch.randn(96, 64) / 8
        for schedule in ("persistent", "persistent-ws"):  # a program an SM (4 under the interpreter) over the tiles
            out = T.linear_gelu(x, w, None, (32, 32, 32, 2, 4, 1), schedule=schedule)
            torch.testing.assert_close(out, F.gelu(x @ w.T, approximate="tanh"), rtol=1e-5, atol=1e-5)
        try:
            T.linear_gelu(x, w, None, schedule="stream-k")
        except ValueError as exc:
            assert "schedule must be one of" in str(exc)
        else:
            raise AssertionError("an unknown schedule was accepted")
        x = torch.tensor([-100.0, -20.0, -5.0, -1e-4, 0.0, 1e-4, 3.0, 50.0, 1e4]).view(-1, 1)
        tails = T.linear_gelu(x, torch.ones(1, 1), None, (16, 16, 16, 1, 4, 1), tma=False)
        torch.testing.assert_close(tails, F.gelu(x, approximate="tanh"), rtol=1e-4, atol=1e-6)
        for bad in [(torch.zeros(4, 3), torch.zeros(5, 2), None), (torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4))]:
            try:
                T.linear_gelu(*bad)
            except ValueError:
                pass
            else:
                raise AssertionError("mismatched shapes were accepted")
        print("OK")
    """)


def test_the_gemm_epilogues_benchmarks_triton_rows_pass_under_the_interpreter():
    """benchmarks/gemm_epilogues.py's rows of flowtok's kernels, every launch shape and schedule of its sweeps
    (16-bit and e4m3 operands), against fp32."""
    bench = str(Path(__file__).parents[1] / "benchmarks")
    _interpreted(f"""
        import sys
        sys.path.insert(0, {bench!r})
        import gemm_epilogues as G

        data = G.main(["--device", "cpu", "--rows", "80", "--width", "64", "--hidden", "96", "--calls", "1"])
        rows = {{i["name"]: i for i in data["items"]}}
        assert all(i["status"] == "ok" for i in rows.values()), rows
        def errors(prefix):
            return [i["rel_err"] for name, i in rows.items() if name.startswith(prefix)]
        def count(launches):  # TMA tiles and persistent for each, warp-specialised at 8 warps, pointer tiles once
            return 2 * len(launches) + sum(launch[4] == 8 for launch in launches) + 1
        assert len(errors("fc1 triton")) == count(G.LAUNCHES) and max(errors("fc1 triton")) < 1e-5
        # e4m3 operands, e4m3 out: within e4m3's rounding of the dequantised GELU
        assert len(errors("fc1 fp8 triton")) == count(G.LAUNCHES_FP8)
        assert 0 < min(errors("fc1 fp8 triton")) and max(errors("fc1 fp8 triton")) < 0.05
        # fc2 into the stream: the same sums in fp32; bf16 at the default launch only
        assert len(errors("fc2 triton")) == count(G.LAUNCHES[:1]) and max(errors("fc2 triton")) < 1e-5
        assert len(errors("fc2 fp8 triton")) == count(G.LAUNCHES_FP8) and max(errors("fc2 fp8 triton")) < 1e-5
        schedules = {{i.get("schedule") for i in rows.values()}} - {{None}}
        assert schedules == {{"tiles", "persistent", "persistent-ws"}}, schedules
        print("OK")
    """)


def test_linear_gelu_kernel_takes_fp8_operands_and_writes_the_next_fp8_input():
    """e4m3 input and weight with static (one) or per-row / per-column scales, as FP8Linear holds them: bf16 out
    to one bf16 step of the dequantised product's GELU; with an output scale, the e4m3 bytes of PyTorch's cast of
    that GELU (one e4m3 step at an fp32 tie)."""
    _interpreted("""
        import torch
        import torch.nn.functional as F
        from flowtok.nn import triton_ops as T
        from flowtok.nn.fp8 import E4M3_MAX, quantize_rows, quantize_tensor, to_e4m3

        torch.manual_seed(0)
        m, k, n = 70, 64, 96
        x, w, b = 2 * torch.randn(m, k), torch.randn(n, k) / 8, torch.randn(n)
        for static in (True, False):
            (qx, sx), (qw, sw) = (quantize_tensor(x), quantize_tensor(w)) if static else (quantize_rows(x),
                                                                                          quantize_rows(w))
            if not static:
                sw = sw.reshape(1, -1)  # one scale an output column, as FP8Linear keeps it
            ref = F.gelu((qx.float() * sx) @ (qw.float() * sw.reshape(-1, 1)).T + b, approximate="tanh")
            for tma in (False, True):
                out = T.linear_gelu(qx, qw, b, (32, 32, 32, 2, 4, 1), tma=tma, x_scale=sx, w_scale=sw)
                assert out.dtype == torch.bfloat16 and out.shape == (m, n)
                assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-5).all()
                out_scale = torch.tensor(float(ref.abs().max()) / 2 / E4M3_MAX)  # half the range: saturates
                q = T.linear_gelu(qx, qw, b, (32, 32, 32, 2, 4, 1), tma=tma, x_scale=sx, w_scale=sw,
                                  out_scale=out_scale)
                r = to_e4m3(ref, out_scale).float()
                assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == E4M3_MAX
                step = 2.0 ** (torch.floor(torch.log2(r.abs().clamp(min=2 ** -6))) - 3)
                assert ((q.float() - r).abs() <= step).all() and float((q.float() == r).float().mean()) > 0.999
        for bad in [dict(x_scale=torch.ones(())), dict(out_scale=torch.ones(()))]:
            try:
                T.linear_gelu(x, w, b, **bad)  # scales belong to e4m3 operands
            except ValueError:
                pass
            else:
                raise AssertionError(f"{bad} accepted for float operands")
        print("OK")
    """)


def test_fused_fp8_flow_with_the_triton_gemm_epilogues_is_the_fp8_blocks_without_their_bf16_roundings():
    """Static scales: fc1's kernel writes fc2's e4m3 input itself; per-row scales: bf16 out, quantised after; FP8
    proj and fc2 add their gated output into the stream in their epilogue. The kernels round each accumulator
    once, where the plain FP8 block rounds the products to bf16 (and fc1's again after its GELU): with those
    roundings taken out of the plain FP8 Linear (an fp32 product), the two agree to fp32 rounding; as they are,
    the kernels' path is no further from the float model than the plain FP8 blocks are."""
    _interpreted("""
        import copy
        import torch
        from flowtok.nn import fp8, triton_ops

        base = live_tiny_flow()
        calls, residuals = [], []
        fn, residual = triton_ops.linear_gelu, triton_ops.linear_residual
        triton_ops.linear_gelu = lambda *a, **k: calls.append(k.get("out_scale")) or fn(*a, **k)
        triton_ops.linear_residual = lambda *a, **k: residuals.append(1) or residual(*a, **k)
        x, t = torch.randn(6, 8, 4), torch.tensor(0.37)
        nulls = torch.tensor([0, 0, 0, 1, 1, 1])
        rel = lambda a, b: float((a - b).norm() / b.norm())

        def fp8_flow(static):
            model = copy.deepcopy(base)
            model.quantize_fp8(emulate=True, calibrate=(lambda: model(x, t.expand(6), torch.tensor([0] * 6)))
                               if static else None)
            return model

        def fused(model, gemm_epilogues):
            model.enable_fused_inference(min_rows=0, gemm_epilogues=gemm_epilogues)
            return model.forward_grouped(x, t, (0, 1))

        with torch.no_grad():
            ref = base(x, t.expand(6), nulls)
            for static in (True, False):
                model = fp8_flow(static)
                plain = model(x, t.expand(6), nulls)
                calls.clear()
                residuals.clear()
                out = fused(model, "triton")
                assert len(calls) == model.config.depth and all((s is not None) == static for s in calls)
                assert len(residuals) == 2 * model.config.depth  # proj and fc2
                assert rel(out, ref) <= 1.1 * rel(plain, ref) + 1e-3, (static, rel(out, ref), rel(plain, ref))

            def matmul_fp32(self, q, scale, bias=True):  # the emulated FP8 product, not rounded to bf16
                w = self.weight_fp8.float() * (self.weight_scale if self.static else self.weight_scale.t())
                y = (q.float() * scale) @ w.t()
                return y + self.bias if bias and self.bias is not None else y

            fp8.FP8Linear.matmul = matmul_fp32
            model = fp8_flow(True)
            triton = fused(model, "triton")
            torch.testing.assert_close(triton, fused(model, "pytorch"), rtol=1e-5, atol=1e-5)
            calls.clear()
            residuals.clear()
            assert torch.equal(fused(model, "auto"), triton)  # "auto": flowtok's GEMMs for FP8 Linears
            assert len(calls) == model.config.depth and len(residuals) == 2 * model.config.depth
        print("OK")
    """)



def test_linear_residual_kernel_adds_each_groups_gated_product_into_the_stream():
    """``stream[g] += gate[g] * (x[g] @ W^T + b)`` in place: float operands (bf16 to one bf16 step), e4m3 ones with
    static or per-row / per-column scales against the dequantised arithmetic; both load paths; bad shapes refused."""
    _interpreted("""
        import torch
        from flowtok.nn import triton_ops as T
        from flowtok.nn.fp8 import quantize_rows, quantize_tensor

        torch.manual_seed(0)
        g, r, k, n = 2, 37, 64, 96
        stream, x = torch.randn(g, r, n), torch.randn(g * r, k)
        w, b = torch.randn(n, k) / 8, torch.randn(n)
        gate = torch.randn(g, 3 * n)[:, n:2 * n]  # a chunk of the adaLN output: strided rows

        def expected(product):
            return stream + gate.unsqueeze(1) * product.view(g, r, n)

        launch = (32, 32, 32, 2, 4, 1)
        for tma in (False, True):
            s = stream.clone()
            assert T.linear_residual(s, x, w, b, gate, launch, tma=tma) is None
            torch.testing.assert_close(s, expected(x @ w.T + b), rtol=1e-5, atol=1e-5)
            s16 = stream.bfloat16()
            T.linear_residual(s16, x.bfloat16(), w.bfloat16(), None, gate.bfloat16(), launch, tma=tma)
            ref16 = stream.bfloat16().float() + gate.bfloat16().float().unsqueeze(1) * (
                x.bfloat16().float() @ w.bfloat16().float().T).view(g, r, n)
            assert ((s16.float() - ref16).abs() <= ref16.abs() * 2 ** -7 + 1e-5).all()
            for static in (True, False):
                (qx, sx), (qw, sw) = (quantize_tensor(x), quantize_tensor(w)) if static else (quantize_rows(x),
                                                                                              quantize_rows(w))
                sw = sw if static else sw.reshape(1, -1)
                deq = (qx.float() * sx) @ (qw.float() * sw.reshape(-1, 1)).T + b
                for schedule in ("tiles", "persistent", "persistent-ws") if tma else ("tiles",):  # TMA only
                    s = stream.clone()
                    T.linear_residual(s, qx, qw, b, gate, launch, tma=tma, x_scale=sx, w_scale=sw, schedule=schedule)
                    torch.testing.assert_close(s, expected(deq), rtol=1e-5, atol=1e-5)
        # a tile of 64 rows spans the two groups of 37 rows and more: a gate per element, not two gate rows; and
        # the epilogue over the whole tile rather than in two column halves
        T.LINEAR_SPLIT = False
        for launch in [(64, 32, 32, 2, 4, 1), (32, 32, 32, 2, 4, 1)]:
            s = stream.clone()
            T.linear_residual(s, x, w, b, gate, launch)
            torch.testing.assert_close(s, expected(x @ w.T + b), rtol=1e-5, atol=1e-5)
        T.LINEAR_SPLIT = True
        for bad in [dict(stream=torch.zeros(g, r + 1, n)), dict(gate=torch.zeros(3, n)),
                    dict(stream=torch.zeros(g, n, r).transpose(1, 2))]:
            args = {**dict(stream=stream.clone(), x=x, weight=w, bias=b, gate=gate), **bad}
            try:
                T.linear_residual(**args)
            except ValueError:
                pass
            else:
                raise AssertionError(f"{list(bad)} accepted")
        print("OK")
    """)



def test_the_gemms_compile_for_hopper_pipelined_without_spills():
    """benchmarks/kernel_compile.py on this machine: Triton compiles the GEMMs for sm_90 without a GPU, and ptxas
    counts their registers. At the default launches and schedule, both epilogues, bf16 and e4m3: wgmma, a pipelined
    main loop (shared memory for every stage of both operands' tiles, within the 227 KB a block may use) and at most
    a few bytes of spills (an unsplit residual epilogue spilled about 1 KB a thread)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import kernel_compile

    from flowtok.nn import triton_ops

    for dtype, launch in [("bf16", triton_ops.LINEAR_LAUNCH), ("fp8e4nv", triton_ops.LINEAR_LAUNCH_FP8)]:
        block_m, block_n, block_k, _, _, stages = launch
        tile_bytes = (block_m + block_n) * block_k * (2 if dtype == "bf16" else 1)
        for residual in (False, True):
            row = kernel_compile.compile_linear(dtype, launch, residual, schedule=triton_ops.LINEAR_SCHEDULE)
            assert row["wgmma"] and row["shared_fits"], row
            assert row["shared_bytes"] >= stages * tile_bytes, row
            assert row["spill_store_bytes"] is not None and row["spill_store_bytes"] <= 64, row
    # the persistent schedules compile too (warp specialisation at 8 warps)
    for schedule in ("persistent", "persistent-ws"):
        row = kernel_compile.compile_linear("bf16", triton_ops.LINEAR_LAUNCH, False, schedule=schedule)
        assert row["wgmma"] and row["shared_fits"] and row["spill_store_bytes"] <= 64, row
