"""The fused DiT inference path and the fast pipeline against the plain ones (CPU, fp32, tiny configs).

The CUDA-only pieces (cuBLASLt's GELU epilogue, the compiled add+LayerNorm kernel, CUDA graphs, bf16
tolerances) are exercised by benchmarks/fast_inference.py on a GPU; here the fold itself, the fallbacks,
the sampler's wiring and the benchmark script's tiny mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowtok.errors import InvalidInputError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.nn import fused_dit
from flowtok.sampling import GraphedSampler, euler_sample, heun_sample


def _flow(seed: int = 0) -> FlowTransformer:
    torch.manual_seed(seed)
    model = FlowTransformer(FLOW_PRESETS["tiny"])
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every shift, scale and gate a value
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("groups", [(0, 1), (0,), (1,), (1, 0, 1)])
def test_fused_blocks_equal_the_plain_blocks_in_fp32(groups):
    model = _flow()
    b = 3
    x, t = torch.randn(b * len(groups), 8, 4), torch.tensor(0.37)
    indicator = torch.tensor([g for g in groups for _ in range(b)])
    with torch.no_grad():
        ref = model(x, t.expand(x.shape[0]), indicator)
        model.enable_fused_inference(min_rows=0)
        out = model.forward_grouped(x, t, groups)
    assert ref.abs().max() > 0.5  # the blocks really modulate something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_path_falls_back_to_the_plain_forward_where_it_does_not_apply():
    model = _flow().enable_fused_inference(min_rows=1000)
    x, t = torch.randn(4, 8, 4), torch.tensor(0.5)
    calls = []
    original = fused_dit.fused_blocks_forward
    fused_dit.fused_blocks_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():  # 2 samples x 8 tokens per group < min_rows: the plain blocks, bitwise
            ref = model(x, t.expand(4), torch.tensor([0, 0, 1, 1]))
            assert torch.equal(model.forward_grouped(x, t, (0, 1)), ref)
        model.fused_min_rows = 0
        out = model.forward_grouped(x, t, (0, 1))  # grad enabled (training-like): plain again
        assert out.requires_grad and torch.equal(out.detach(), ref)
        assert not calls
        with torch.no_grad():
            model.forward_grouped(x, t, (0, 1))
        assert calls == [1]
    finally:
        fused_dit.fused_blocks_forward = original
    with pytest.raises(InvalidInputError, match="equal groups"):
        model.forward_grouped(torch.randn(3, 8, 4), t, (0, 1))
    with pytest.raises(InvalidInputError, match="min_rows"):
        model.enable_fused_inference(min_rows=-1)
    with pytest.raises(InvalidInputError, match="gemm_epilogues must be one of auto, pytorch, triton"):
        model.enable_fused_inference(gemm_epilogues="cutlass")


def test_the_triton_gemm_epilogues_falls_back_to_pytorch_where_triton_does_not_run():
    """Outside the interpreter a CPU tensor cannot take the Triton GEMM: ``gemm_epilogues="triton"`` computes what
    ``"pytorch"`` does, bitwise. (The kernel itself is checked under the interpreter in test_triton_ops.py.)"""
    model = _flow()
    x, t = torch.randn(4, 8, 4), torch.tensor(0.3)
    with torch.no_grad():
        ref = model.enable_fused_inference(min_rows=0).forward_grouped(x, t, (0, 1))
        out = model.enable_fused_inference(min_rows=0, gemm_epilogues="triton").forward_grouped(x, t, (0, 1))
    assert model.fused_gemm_epilogues == "triton"
    assert torch.equal(out, ref)
    width = model.config.width
    with pytest.raises(ValueError, match="gemm_epilogues must be one of"):
        fused_dit.fused_blocks_forward(model.blocks, model.final_layer, torch.randn(2, 8, width),
                                       torch.randn(1, width), gemm_epilogues="cutlass")


@pytest.mark.parametrize("solver,guidance", [(euler_sample, 3.0), (euler_sample, 1.0), (heun_sample, 2.0)])
def test_samplers_use_the_fused_path_and_keep_their_numbers(solver, guidance):
    model = _flow(1)
    x0 = torch.randn(5, 8, 4)
    ref = solver(model, x0, num_steps=3, guidance_scale=guidance)
    model.enable_fused_inference(min_rows=0)
    torch.testing.assert_close(solver(model, x0, num_steps=3, guidance_scale=guidance), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(GraphedSampler(model, num_steps=3, guidance_scale=guidance)(x0) if solver is
                               euler_sample else ref, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.disable_fused_inference().forward_grouped(x0, torch.tensor(0.0), (0,)),
                           torch.zeros_like(x0))


def test_the_gelu_epilogue_probe_tells_tanh_from_exact(monkeypatch):
    cpu = torch.device("cpu")
    fused_dit._GELU_EPILOGUE.clear()
    # PyTorch's CPU kernel applies exact GELU: the epilogue must not be used for the block's tanh-GELU.
    assert not fused_dit.gelu_epilogue_is_tanh(cpu, torch.float32)
    assert not fused_dit.gelu_epilogue_is_tanh(cpu, torch.bfloat16)

    def tanh_epilogue(bias, a, b, use_gelu=False, out=None):
        return F.gelu(torch.addmm(bias, a, b), approximate="tanh")

    fused_dit._GELU_EPILOGUE.clear()
    monkeypatch.setattr(torch, "_addmm_activation", tanh_epilogue)
    assert fused_dit.gelu_epilogue_is_tanh(cpu, torch.float32)
    assert fused_dit.gelu_epilogue_is_tanh(cpu, torch.bfloat16)
    fused_dit._GELU_EPILOGUE.clear()


def test_the_epilogue_branch_computes_the_same_block(monkeypatch):
    """With a tanh-GELU ``_addmm_activation`` standing in for cuBLASLt's, the epilogue branch is exact too."""
    def tanh_epilogue(bias, a, b, use_gelu=False, out=None):
        result = F.gelu(torch.addmm(bias, a, b), approximate="tanh")
        return result if out is None else out.copy_(result)

    model = _flow(2)
    x, t = torch.randn(4, 8, 4), torch.tensor(0.8)
    with torch.no_grad():
        ref = model(x, t.expand(4), torch.tensor([0, 0, 1, 1]))
        monkeypatch.setattr(torch, "_addmm_activation", tanh_epilogue)
        monkeypatch.setitem(fused_dit._GELU_EPILOGUE, ("cpu", torch.float32), True)
        out = model.enable_fused_inference(min_rows=0).forward_grouped(x, t, (0, 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mode", ["dynamic", "static", "static-inputs-only"])
def test_fp8_blocks_run_fused_and_match_the_plain_fp8_blocks(mode, monkeypatch):
    """Emulated FP8 (the quantised numbers, float matmuls): the fused path quantises the same inputs as the plain
    FP8 blocks do, so it lands far closer to them than FP8 is to the float model."""
    from flowtok.nn.fp8 import FP8Linear

    model = _flow(3)
    x, t = torch.randn(6, 8, 4), torch.tensor(0.42)
    indicator = torch.tensor([0, 0, 0, 1, 1, 1])
    calib_x = torch.randn(6, 8, 4)
    with torch.no_grad():
        ref = model(x, t.expand(6), indicator)
        model.enable_fused_inference(min_rows=0)  # calibration must still see the Linears' inputs
        calibrate = None if mode == "dynamic" else (lambda: model.forward_grouped(calib_x, t, (0, 1)))
        model.quantize_fp8(emulate=True, calibrate=calibrate,
                           layers=("qkv", "fc1") if mode == "static-inputs-only" else None)
        layers = [m for m in model.blocks.modules() if isinstance(m, FP8Linear)]
        assert len(layers) == (2 if mode == "static-inputs-only" else 4) * len(model.blocks)
        assert all(m.static == (mode != "dynamic") for m in layers)
        plain = model(x, t.expand(6), indicator)
        calls = []
        original = FP8Linear.matmul
        monkeypatch.setattr(FP8Linear, "matmul", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        fused = model.forward_grouped(x, t, (0, 1))
    assert len(calls) == len(layers)  # every FP8 Linear ran once, inside the fused blocks
    fp8_error = _rel(plain, ref)
    assert 1e-3 < fp8_error < 0.3  # FP8 is really on (this tiny flow has large random gates: a large error)
    assert _rel(fused, plain) < 0.1 * fp8_error, (_rel(fused, plain), fp8_error)


@pytest.mark.parametrize("form", ["rows", "gelu", "heads"])
@pytest.mark.parametrize("static", [True, False])
def test_the_fp8_quantisers_trace_as_one_graph_and_match_eager(form, static):
    """On an FP8 GPU each quantiser of the fused path runs compiled (fullgraph): it must trace without a break,
    and the traced graph must give the eager bytes (checked here with the aot_eager backend)."""
    fn = fused_dit._QUANTIZERS[(form, static)]
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 8, 16) if form == "heads" else 3 * torch.randn(32, 64)).bfloat16()
    args = (x, torch.tensor(0.01)) if static else (x,)
    traced = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)(*args)
    eager = fn(*args)
    for a, b in zip(*((r if isinstance(r, tuple) else (r,)) for r in (traced, eager))):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float())
    q = eager[0] if isinstance(eager, tuple) else eager
    assert q.dtype == torch.float8_e4m3fn
    assert q.shape == ((2 * 8, 4 * 16) if form == "heads" else x.shape)  # heads: [B * N, H * dh] token rows


def test_fp8_layers_are_chosen_by_name():
    from flowtok.nn.fp8 import FP8Linear

    model = _flow().quantize_fp8(emulate=True, layers=("qkv", "fc1", "fc2"))
    for block in model.blocks:
        assert [type(m) is FP8Linear for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)] \
            == [True, False, True, True]
    for bad in ((), ("qkv", "adaLN_modulation"), "qkv"):
        with pytest.raises(InvalidInputError, match="layers must name"):
            _flow().quantize_fp8(emulate=True, layers=bad)


def test_blocks_the_fused_path_cannot_run_are_refused():
    model = _flow()
    model.blocks[1].attn.q_norm = torch.nn.LayerNorm(16)
    with pytest.raises(InvalidInputError, match="standard blocks"):
        model.enable_fused_inference()


# ------------------------------------------------------------------------------------ the fast pipeline
def _pipeline():
    from dataclasses import replace

    from flowtok.config import preset
    from flowtok.pipelines import FlowTokPipeline
    from flowtok.text import PROJECTOR_PRESETS, TextProjector, load_text_encoder
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    k, c = 4, 4
    encoder = load_text_encoder("minilm", max_length=k)
    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=encoder.dim, text_len=k, token_channels=c))
    flow = FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=k, in_channels=c))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        tok.decoder.text_proj.weight.normal_(0, 1)
        tok.decoder.to_pixels.weight.normal_(0, 0.5)
    projector = TextProjector(replace(PROJECTOR_PRESETS["tiny"], text_dim=encoder.dim, latent_channels=c))
    return FlowTokPipeline(tok, encoder, projector, flow).to("cpu")


PROMPTS = ["red circle", "blue square", "green"]  # 4 tokens with [CLS] and [SEP]: none truncated


@pytest.fixture(scope="module")
def pipe():
    return _pipeline()


def _images(pipe, **kwargs):
    return pipe.text_to_image(PROMPTS, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                              generator=torch.Generator().manual_seed(5), **kwargs)


def test_fast_pipeline_returns_the_plain_pipelines_images(pipe):
    ref = _images(pipe)
    assert ref.std() > 0.01
    pipe.enable_fast_inference(batch_size=2)  # 3 prompts: a full chunk and a padded one
    assert pipe.fast is not None and not pipe.fast.compile and not pipe.fast.cuda_graph  # CPU defaults
    pipe.t2i_flow.fused_min_rows = 0  # the tiny flow would otherwise stay below the fused path's threshold
    calls = []
    original = fused_dit.fused_blocks_forward
    fused_dit.fused_blocks_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        fast = _images(pipe)
    finally:
        fused_dit.fused_blocks_forward = original
    assert len(calls) == 2 * 2  # 2 chunks x 2 steps, all fused
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_images(pipe, sample_text_latent=False, fast=False),
                               _images(pipe, sample_text_latent=False), rtol=1e-5, atol=1e-5)
    uint8 = pipe.fast.generate(PROMPTS, pipe.defaults.override(num_inference_steps=2, guidance_scale=3.0),
                               torch.Generator().manual_seed(5), uint8=True)
    pil = pipe.text_to_image(PROMPTS, num_inference_steps=2, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(5), fast=False)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 32, 32, 3)
    diff = (uint8.int() - torch.stack([torch.tensor(np.array(i)) for i in pil]).int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    pipe.disable_fast_inference()
    assert pipe.fast is None and not pipe.t2i_flow.grouped_condition


def test_fast_pipeline_compiles_its_regions_and_survives_an_uncapturable_encoder(pipe, monkeypatch):
    from flowtok.fast import FastTextToImage

    ref = _images(pipe)
    # The "eager" backend checks the regional compile's wiring (dynamo tracing of the decoder's blocks).
    pipe.fast = FastTextToImage(pipe, compile=True, cuda_graph=True, compile_options={"backend": "eager"})
    encode = pipe.text_encoder.encode_tokens
    failures = []

    def capture_fails_once(ids, mask):
        if not failures:
            failures.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")
        return encode(ids, mask)

    monkeypatch.setattr(pipe.text_encoder, "encode_tokens", capture_fails_once)
    torch.testing.assert_close(_images(pipe), ref, rtol=1e-5, atol=1e-5)
    assert failures and not pipe.fast.text_encoder_in_graph
    assert all(b._compiled_call_impl is not None for b in pipe.image_tokenizer.decoder.blocks)
    pipe.disable_fast_inference()
    assert all(b._compiled_call_impl is None for b in pipe.image_tokenizer.decoder.blocks)
    with pytest.raises(InvalidInputError, match="batch_size"):
        pipe.enable_fast_inference(batch_size=0)


def test_fast_inference_benchmark_tiny(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_fast_inference", bench_dir / "fast_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    spec.loader.exec_module(module)
    data = module.main(["--tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--latency-iters", "1",
                        "--pipeline-batches", "2", "--out", str(tmp_path / "f.json")])
    items = {i["name"]: i for i in data["items"]}
    assert not [i for i in items.values() if i["status"] == "error"], items
    check = items["fused numerics FlowTok-XL"]
    assert check["pass"] and check["fused_fp32_vs_plain_fp32"] < 1e-5 and not check["gelu_epilogue_tanh"]
    assert {"flow plain b3", "flow fused+graph b3", "flowtok pipeline 1-step b3", "latency 1 prompt 1 step",
            "flowtok pipeline 2-step b2", "flowtok pipeline 1-step b3 from prompts"} <= set(items)
    assert items["latency 1 prompt 1 step"]["median_ms"] > 0
    assert all(i["images_per_s"] > 0 for i in items.values() if "images_per_s" in i)
    assert (tmp_path / "f.json").stat().st_size > 0


# ------------------------------------------------------------------------------------ the CLI switch
@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    return _pipeline().save_pretrained(tmp_path_factory.mktemp("fast-pipe") / "pipe")


def test_fast_inference_fp8_flow_mode_tiny(tmp_path, monkeypatch):
    """``--fp8-flow``: the FP8 flows (emulated on the CPU) through the fused path beside bf16, then the pipelines."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("bench_fast_inference_fp8", bench_dir / "fast_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    calls = []
    original = fused_dit.fused_blocks_forward
    monkeypatch.setattr(fused_dit, "fused_blocks_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    data = module.main(["--tiny", "--device", "cpu", "--fp8-flow", "--min-rows", "0", "--warmup", "0", "--iters",
                        "1", "--pipeline-batches", "2", "--out", str(tmp_path / "f.json")])
    items = {i["name"]: i for i in data["items"]}
    assert not [i for i in items.values() if i["status"] == "error"], items
    check = items["fused fp8 numerics FlowTok-XL"]
    assert check["pass"]
    assert "skipped" in items["fp8 layernorm kernel"]  # no Triton here: tests/test_triton_ops.py runs it interpreted
    for form in ("fp8s", "fp8s-no-proj", "fp8s-in"):
        assert items[f"quantize flow {form}"]["static"] and items[f"quantize flow {form}"]["emulated"]
        assert check[f"fused_vs_plain_{form}"] < check[f"plain_{form}_vs_fp32"]
        assert items[f"flow fused {form}+graph b3"]["status"] == "ok"
        assert items[f"flow fused {form}+graph b2"]["status"] == "ok"
    per_form = {form: items[f"quantize flow {form}"]["fp8_layers"] for form in ("fp8s", "fp8s-no-proj", "fp8s-in")}
    assert per_form["fp8s"] == 4 * 2 and per_form["fp8s-no-proj"] == 3 * 2 and per_form["fp8s-in"] == 2 * 2  # depth 2
    best = next(i["variant"] for i in items.values() if i.get("part") == "pipeline")
    assert best in ("fast+fp8s-flow", "fast+fp8s-no-proj-flow", "fast+fp8s-in-flow")
    assert {f"flowtok pipeline 2-step b2 {best}{tag}" for tag in ("", "+fp8-decoder")} <= set(items)
    assert calls  # the flows sampled through the fused path


def test_cli_generate_fast_gives_the_plain_images_on_a_cpu(saved_pipe, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from flowtok import fast as fastlib
    from flowtok.cli import main

    args = ["generate", "red circle", "--n", "3", "--batch-size", "2", "--steps", "2", "--guidance", "3.0",
            "--model", str(saved_pipe), "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert "--fast" not in capsys.readouterr().err
    monkeypatch.setattr(fastlib, "DEFAULT_FUSED_MIN_ROWS", 0)  # the tiny flow: fused from one prompt on
    calls = []
    original = fused_dit.fused_blocks_forward
    monkeypatch.setattr(fused_dit, "fused_blocks_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main([*args, "-o", str(tmp_path / "fast.png"), "--fast"]) == 0
    err = capsys.readouterr().err
    assert "--fast on cpu" in err and "CUDA GPU" in err and "batches of 1 prompts" in err
    assert len(calls) == 2 * 2  # batches of 2 and 1 (padded to 2), 2 steps each, all fused
    for i in range(3):
        plain = np.array(Image.open(tmp_path / f"plain-{i}.png")).astype(int)
        fast = np.array(Image.open(tmp_path / f"fast-{i}.png")).astype(int)
        assert plain.std() > 1 and np.abs(plain - fast).max() <= 1
    assert not (np.array(Image.open(tmp_path / "plain-0.png")) == np.array(Image.open(tmp_path / "plain-1.png"))).all()


def test_cli_eval_t2i_fast_records_what_ran(saved_pipe, tmp_path, monkeypatch, capsys):
    import json

    from flowtok import fast as fastlib
    from flowtok.cli import main

    args = ["eval", "t2i", "--model", str(saved_pipe), "--device", "cpu", "--n", "2", "--objects", "1",
            "--split", "seen", "--steps", "2", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "plain.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "big.json"), "--fast"]) == 0  # default threshold: not fused
    big = json.loads((tmp_path / "big.json").read_text())["fast"]
    assert big["fused_flow"] and not big["fused_flow_used"] and big["fused_min_batch"] == 4096 // 4
    assert not big["compile"] and not big["cuda_graph"] and big["batch_size"] == 2 and not big["fp8_decoder"]
    monkeypatch.setattr(fastlib, "DEFAULT_FUSED_MIN_ROWS", 0)
    assert main([*args, "--out", str(tmp_path / "fast.json"), "--fast"]) == 0
    plain, fast = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "fast"))
    assert "fast" not in plain and fast["fast"]["fused_flow_used"] and fast["options"]["fast"]
    assert fast["accuracy"] == plain["accuracy"] and fast["protocol"] == plain["protocol"]
    assert fast["fast"]["gemm_epilogues"] == "auto"
    # flowtok's Triton epilogues asked for: recorded; on a CPU without Triton's interpreter the PyTorch kernels run
    assert main([*args, "--out", str(tmp_path / "triton.json"), "--fast", "--gemm-epilogues", "triton"]) == 0
    triton = json.loads((tmp_path / "triton.json").read_text())
    assert triton["fast"]["gemm_epilogues"] == "triton" and triton["accuracy"] == plain["accuracy"]
    capsys.readouterr()
    # --fast and --fp8 combine now; on a CPU it is FP8 that is refused, in one line
    assert main([*args, "--fast", "--fp8", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "FP8 matmuls need a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    assert main(["generate", "x", "--fast", "--fp8", "--model", str(saved_pipe), "--device", "cpu"]) == 2


def test_the_profile_variants_compute_the_fused_block(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import fast_profile

    model = _flow(3)
    x, t = torch.randn(6, 8, 4), torch.tensor(0.6)
    with torch.no_grad():
        ref = model(x, t.expand(6), torch.tensor([0, 0, 0, 1, 1, 1]))
        model.enable_fused_inference(min_rows=0)
        # sdpa-efficient has no CPU kernel; the others run here (sdpa-flash on the CPU's flash attention)
        for name in [v for v in fast_profile.VARIANTS if v != "sdpa-efficient"]:
            with fast_profile.variant(name, torch.device("cpu"), torch.float32), fast_profile.fold_ranges():
                torch.testing.assert_close(model.forward_grouped(x, t, (0, 1)), ref, rtol=1e-5, atol=1e-5)
        assert fused_dit._block is not fast_profile._block_fold_in  # restored
        assert fused_dit._fold_out.__name__ == "_fold_out"
    assert fast_profile.kernel_category("aten::addmm_") == "GEMM"
    assert fast_profile.kernel_category("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT") == "GEMM"
    assert fast_profile.kernel_category("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96>>") == "attention"
    assert fast_profile.kernel_category("triton_per_fused_native_layer_norm_0") == "layernorm/elementwise"


def test_fast_inference_profile_mode_tiny(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_fast_inference_p", bench_dir / "fast_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    spec.loader.exec_module(module)
    data = module.main(["--tiny", "--device", "cpu", "--profile", "--profile-steps", "1", "--warmup", "0",
                        "--iters", "1", "--out", str(tmp_path / "p.json")])
    items = {i["name"]: i for i in data["items"]}
    variants = ("no-epilogue", "per-group", "no-triton", "fold-in")  # the default --variants
    assert len(items) == 2 + 2 * len(variants) + 1
    assert [i["status"] for i in items.values()] == ["ok"] * len(items), items
    plain, fused = items["profile plain compile b3"], items["profile fused b3"]
    for item in (plain, fused, *(items[f"profile fused {v} b3"] for v in variants)):
        assert abs(sum(c["share"] for c in item["categories"].values()) - 1) < 1e-6
        assert item["categories"]["GEMM"]["share"] > 0.05 and item["top"]
    assert plain["categories"]["fold"]["ms"] == 0 < fused["categories"]["fold"]["ms"]
    assert items["profile fused fold-in b3"]["categories"]["fold"]["ms"] > 0
    for v in variants:  # bf16: the same numbers, but fold-in's folded weights round differently
        tol = 1e-2 if v == "fold-in" else 1e-6
        assert items[f"profile fused {v} b3"]["rel_diff_vs_fused"] < tol
        assert items[f"flow fused {v}+plain b3"]["rel_diff_vs_fused"] < tol
    assert "profile fused b3" in data["summary"]


def test_fp8_decoder_goes_before_the_fast_path_and_keeps_the_images_close():
    pipe = _pipeline()
    ref = _images(pipe)
    pipe.enable_fast_inference()
    with pytest.raises(InvalidInputError, match="before enable_fast_inference"):
        pipe.quantize_decoder_fp8(emulate=True)
    pipe.disable_fast_inference()
    pipe.quantize_decoder_fp8(calibration_prompts=["yellow triangle", "red square"], emulate=True)
    layers = [m for m in pipe.image_tokenizer.decoder.blocks.modules() if type(m).__name__ == "FP8Linear"]
    assert layers and all(m.static for m in layers)
    pipe.enable_fast_inference(batch_size=2)
    assert pipe.fast is not None and pipe.fast.describe()["fp8_decoder"]
    out = _images(pipe)
    assert 0 < float((out - ref).abs().max()) < 0.1


def test_fp8_flow_goes_before_the_fast_path_and_samples_fused():
    from flowtok import fast as fastlib
    from flowtok.nn.fp8 import FP8Linear

    pipe = _pipeline()
    pipe.enable_fast_inference()
    with pytest.raises(InvalidInputError, match="before enable_fast_inference"):
        pipe.quantize_fp8(emulate=True)
    pipe.disable_fast_inference()
    pipe.quantize_fp8(calibration_prompts=["yellow triangle", "red square"], emulate=True)
    assert all(m.static for m in pipe.t2i_flow.blocks.modules() if isinstance(m, FP8Linear))
    ref = _images(pipe)  # the plain FP8 blocks
    calls = []
    original = fused_dit.fused_blocks_forward
    fused_dit.fused_blocks_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        pipe.enable_fast_inference(batch_size=2)
        pipe.t2i_flow.fused_min_rows = 0
        assert pipe.fast is not None and pipe.fast.describe()["fp8_flow"]
        assert fastlib.FastTextToImage.describe(pipe.fast)["fused_flow"]
        out = _images(pipe)
    finally:
        fused_dit.fused_blocks_forward = original
        pipe.disable_fast_inference()
    assert len(calls) == 2 * 2  # 2 chunks x 2 steps, all fused
    assert float((out - ref).abs().max()) < 0.05


def test_fp8_calibration_is_reproducible():
    """The calibration calls draw their noise from a fixed seed: the same prompts give the same static scales."""
    from flowtok.nn.fp8 import FP8Linear

    def scales(decoder: bool, seed: int) -> list[float]:
        pipe = _pipeline()
        torch.manual_seed(seed)  # the global generator's state must not matter
        if decoder:
            pipe.quantize_decoder_fp8(calibration_prompts=["yellow triangle", "red square"], emulate=True)
        else:
            pipe.quantize_fp8(calibration_prompts=["yellow triangle", "red square"], emulate=True)
        root = pipe.image_tokenizer.decoder.blocks if decoder else pipe.t2i_flow.blocks
        return [float(m.input_scale) for m in root.modules() if isinstance(m, FP8Linear)]

    for decoder in (False, True):
        first = scales(decoder, 1)
        assert first and scales(decoder, 2) == first


def test_cli_fp8_layers_and_gemm_epilogues_are_checked_before_anything_runs(saved_pipe, tmp_path, capsys):
    from flowtok.cli import main

    base = ["--model", str(saved_pipe), "--device", "cpu"]
    eval_args = ["eval", "t2i", *base, "--n", "1", "--objects", "1", "--split", "seen", "--out", str(tmp_path / "e.json")]
    for args, message in (([*eval_args, "--fp8-layers", "qkv"], "--fp8-layers needs --fp8"),
                          (["generate", "x", *base, "-o", str(tmp_path / "x.png"), "--fp8-layers", "qkv,fc1"],
                           "--fp8-layers needs --fp8"),
                          ([*eval_args, "--fast", "--fp8", "--fp8-layers", "qkv,attn"], "layers must name"),
                          ([*eval_args, "--gemm-epilogues", "triton"], "--gemm-epilogues needs --fast"),
                          (["generate", "x", *base, "-o", str(tmp_path / "x.png"), "--gemm-epilogues", "triton"],
                           "--gemm-epilogues needs --fast")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "x.png").exists()


def test_cli_fp8_decoder_needs_an_fp8_gpu(saved_pipe, tmp_path, capsys):
    from flowtok.cli import main
    from flowtok.nn.fp8 import fp8_supported

    if fp8_supported():
        pytest.skip("this machine has FP8 matmuls: the refusal is for those without")
    assert main(["generate", "x", "--fast", "--fp8-decoder", "--model", str(saved_pipe), "--device", "cpu",
                 "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compute capability" in err[0] and not (tmp_path / "x.png").exists()
