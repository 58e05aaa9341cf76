"""Speed options (regional compile, CUDA-graph sampler) keep the numbers; the benchmarks run at tiny sizes.

The CUDA paths themselves need a GPU (benchmarks/run_gpu.sh exercises them); here the CPU fallbacks,
the wiring, and every benchmark script end to end on tiny shapes, so that a GPU call cannot fail on a typo.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flowtok.errors import InvalidInputError
from flowtok.flow import FLOW_PRESETS, FlowObjective, FlowTransformer
from flowtok.sampling import CudaGraphed, GraphedSampler, euler_sample, heun_sample

BENCH = Path(__file__).parents[1] / "benchmarks"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


def _model() -> FlowTransformer:
    torch.manual_seed(0)
    model = FlowTransformer(FLOW_PRESETS["tiny"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.1)
    return model.eval()


def test_compile_blocks_keeps_outputs_gradients_and_names():
    model = _model()
    x, t, null = torch.randn(3, 8, 4), torch.rand(3), torch.tensor([0, 1, 0])
    ref = model(x, t, null)
    keys = list(model.state_dict())
    # The "eager" backend checks the wiring (dynamo tracing of the block, fullgraph) in a second;
    # inductor's kernels themselves are exercised by the GPU benchmark.
    assert model.compile_blocks(backend="eager") is model
    torch.testing.assert_close(model(x, t, null), ref)
    assert list(model.state_dict()) == keys
    model.train().set_grad_checkpointing(True)
    loss, _ = FlowObjective().loss(model, x, torch.randn_like(x))
    loss.backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


@pytest.mark.parametrize("method,solver", [("euler", euler_sample), ("heun", heun_sample)])
def test_graphed_sampler_matches_the_plain_loop_on_cpu(method, solver):
    model = _model()
    x0 = torch.randn(2, 8, 4)
    graphed = GraphedSampler(model, method=method, num_steps=3, guidance_scale=2.5)
    torch.testing.assert_close(graphed(x0), solver(model, x0, num_steps=3, guidance_scale=2.5), rtol=0, atol=0)


def test_graphed_sampler_rejects_bad_settings_up_front():
    model = _model()
    with pytest.raises(InvalidInputError):
        GraphedSampler(model, method="rk4")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        GraphedSampler(model, num_steps=0)
    with pytest.raises(InvalidInputError):
        GraphedSampler(model, guidance_scale=torch.tensor(2.0))  # type: ignore[arg-type]


def test_cuda_graphed_is_a_plain_call_off_cuda():
    calls = []

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a + b

    wrapped = CudaGraphed(fn)
    a, b = torch.ones(2), torch.full((2,), 2.0)
    assert wrapped(a, b).tolist() == [3.0, 3.0]
    assert len(calls) == 1  # no warm-up or capture on the CPU


def test_results_record_oom_errors_and_budget(tmp_path):
    common = _bench("common")
    cpu = torch.device("cpu")
    results = common.Results(tmp_path / "r.json", {"device": "cpu"}, {})
    unlimited = common.Budget()

    def oom():
        raise torch.OutOfMemoryError("out of memory")

    def broken():
        raise ValueError("bad shape")

    assert results.run("ok", lambda: {"x": 1.0}, cpu, unlimited)["x"] == 1.0
    assert results.run("oom", oom, cpu, unlimited) is None
    assert results.run("broken", broken, cpu, unlimited) is None
    assert results.run("late", lambda: {}, cpu, common.Budget(seconds=0.0), reserve_s=1.0) is None
    status = [i["status"] for i in results.data["items"]]
    assert status == ["ok", "oom", "error", "skipped"]
    assert "bad shape" in results.data["items"][2]["error"]
    assert (tmp_path / "r.json").read_text().count('"status"') == 4


def test_time_call_stops_at_the_timed_budget():
    common = _bench("common")
    calls = []
    out = common.time_call(lambda: calls.append(1), torch.device("cpu"), warmup=1, iters=50, max_timed_s=0.0)
    assert out["iters"] == 1 and len(calls) == 2


def test_sampling_benchmark_tiny(tmp_path):
    bench = _bench("sampling")
    data = bench.main(["--tiny", "--device", "cpu", "--models", "FlowTok-XL,pixart", "--variants", "eager,graph,fp8,fp8s",
                       "--pipeline-variants", "eager,graph", "--iters", "1", "--no-text-encoders",
                       "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    items = data["items"]
    assert not [i for i in items if i["status"] == "error"], items
    ours = {(i["part"], i["variant"], i["batch"]) for i in items
            if i.get("model") == "FlowTok-XL" and i["part"] in ("flow", "pipeline")}
    assert ours == {(p, v, b) for p in ("flow", "pipeline") for v in ("eager", "graph") for b in (2, 3)} | {
        ("flow", v, b) for v in ("fp8", "fp8s") for b in (2, 3)}
    for kind in ("fp8", "fp8s"):  # FP8 emulated on the CPU; fp8s calibrated on other inputs
        err = next(i for i in items if i["name"] == f"FlowTok-XL {kind} velocity error")
        assert 0 < err["rel_l2_error"] < 0.05 and err["fp8_linears"] > 0
    assert all(i["images_per_s"] > 0 for i in items if i["status"] == "ok" and i["part"] != "fp8_error")
    if any(i.get("model") == "pixart" and i["status"] == "ok" for i in items):  # diffusers installed
        assert set(data["summary"]) == {"FlowTok-XL/pixart b2", "FlowTok-XL/pixart b3"}
    else:
        assert [i["status"] for i in items if i["name"] == "pixart"] == ["skipped"]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_train_benchmark_tiny(tmp_path):
    bench = _bench("train_step")
    data = bench.main(["--tiny", "--device", "cpu", "--variants", "eager", "--warmup", "0", "--iters", "1",
                       "--out", str(tmp_path / "t.json")])
    items = data["items"]
    largest = [i for i in items if i.get("kind") == "largest_batch"]
    assert [(i["model"], i["largest_batch"]) for i in largest] == [("FlowTok-XL", 8), ("FlowTok-H", 8)]
    steps = [i for i in items if "mfu_vs_mm" in i]
    assert {(i["model"], i["checkpointing"]) for i in steps} == {("FlowTok-XL", False), ("FlowTok-XL", True),
                                                                  ("FlowTok-H", False)}
    assert all(i["model_tflops"] > 0 for i in steps)


def test_profile_benchmark_tiny(tmp_path):
    bench = _bench("profile_sampling")
    data = bench.main(["--tiny", "--device", "cpu", "--variants", "eager,graph", "--steps", "2", "--top", "5",
                       "--out", str(tmp_path / "p.json")])
    names = [i["name"] for i in data["items"]]
    assert names == ["flow eager b2", "flow graph b2", "decoder b2", "projector b2"]
    for item in data["items"]:
        assert item["wall_s"] > 0 and 0 < len(item["top"]) <= 5
        assert all(r["self_ms"] >= 0 and r["calls"] > 0 for r in item["top"])
    assert (tmp_path / "p.json").is_file()


def test_cpu_benchmark_tiny(tmp_path):
    bench = _bench("cpu")
    data = bench.main(["--random", "tiny", "--steps", "1", "--iters", "1", "--out", str(tmp_path / "c.json")])
    items = {i["name"]: i for i in data["items"]}
    assert items["cold start"]["status"] == "ok" and items["cold start"]["total_s"] > 0
    assert items["text_to_image 4 images 1 steps"]["images_per_s"] > 0
    assert items["image_to_text 1 caption 1 steps"]["captions_per_s"] > 0


def test_fp8_gemm_benchmark_tiny(tmp_path):
    bench = _bench("fp8_gemm")
    data = bench.main(["--tiny", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "f.json")])
    items = data["items"]
    assert [i["shape"] for i in items] == ["qkv", "attn_out", "mlp_in", "mlp_out"]
    for i in items:  # every form computes the same product, within FP8's precision
        assert i["bf16_rel_err"] < 0.01 and 0 < i["fp8_rowwise_rel_err"] < 0.06 and i["fp8_tensorwise_rel_err"] < 0.08
    assert (tmp_path / "f.json").is_file()


def test_decoder_profile_benchmark_tiny(tmp_path):
    bench = _bench("decoder_profile")
    data = bench.main(["--tiny", "--device", "cpu", "--calls", "1", "--out", str(tmp_path / "d.json")])
    items = {i["name"]: i for i in data["items"]}
    assert set(items) == {"decoder bf16 b2", "decoder fp8 b2"} and all(i["status"] == "ok" for i in items.values())
    for item in items.values():
        shares = sum(c["share"] for c in item["categories"].values())
        assert item["images_per_s"] > 0 and item["top"] and abs(shares - 1) < 1e-6
    # the FP8 row ran the emulated FP8 layers (a float mm on the dequantised operands), the bf16 row nn.Linear's
    ops = {name: {r["kernel"] for r in items[f"decoder {name} b2"]["top"]} for name in ("bf16", "fp8")}
    assert "aten::mm" in ops["fp8"] and "aten::mm" not in ops["bf16"] and "aten::addmm" in ops["bf16"]


def test_attention_variants_benchmark_on_a_cpu(tmp_path):
    bench = _bench("attention_variants")
    data = bench.main(["--device", "cpu", "--batch", "2", "--calls", "1", "--out", str(tmp_path / "a.json")])
    ok = {i["name"]: i for i in data["items"] if i["status"] == "ok"}
    # the CPU has only SDPA's default choice and the flash kernel of these, and the spelt-out math; all match the
    # fp32 reference
    assert {"sdpa default, strided views", "sdpa flash, contiguous", "math, eager, strided views"} <= set(ok)
    assert all(i["rel_err"] < 1e-5 and i["us"] > 0 for i in ok.values())
    assert data["env"]["floor_bytes"] == 2 * 77 * 4 * (3 * 16 * 72 + 16 * 72)


def test_gemm_epilogues_benchmark_on_a_cpu(tmp_path):
    bench = _bench("gemm_epilogues")
    data = bench.main(["--device", "cpu", "--rows", "96", "--width", "32", "--hidden", "64", "--calls", "1",
                       "--out", str(tmp_path / "g.json")])
    items = {i["name"]: i for i in data["items"]}
    # no Triton, FP8 or inductor rows without a GPU (or the interpreter): the PyTorch forms, each checked against
    # fp32 (the CPU's _addmm_activation applies exact GELU: about 2e-4 from tanh-GELU)
    assert set(items) == {"fc1 addmm, bias epilogue (no GELU)", "fc1 cuBLASLt GELU epilogue (_addmm_activation)",
                          "fc1 addmm then GELU in place", "fc2 cuBLAS baddbmm into the stream (gate folded)"}
    assert all(i["status"] == "ok" and i["us"] > 0 and i["tflops"] > 0 for i in items.values())
    assert items["fc1 addmm then GELU in place"]["rel_err"] < 1e-6
    assert items["fc1 addmm, bias epilogue (no GELU)"]["rel_err"] < 1e-6
    assert 1e-5 < items["fc1 cuBLASLt GELU epilogue (_addmm_activation)"]["rel_err"] < 1e-2
    assert items["fc2 cuBLAS baddbmm into the stream (gate folded)"]["rel_err"] < 1e-6
    assert (tmp_path / "g.json").is_file()


def test_fast_inference_takes_the_fastest_triton_launches_of_a_gemm_epilogues_run(tmp_path, monkeypatch):
    import json

    from flowtok.nn import triton_ops

    bench = _bench("fast_inference")
    for name in ("LINEAR_LAUNCH", "LINEAR_SCHEDULE", "LINEAR_LAUNCH_FP8", "LINEAR_SCHEDULE_FP8"):
        monkeypatch.setattr(triton_ops, name, getattr(triton_ops, name))  # restored after the test
    a, b = [128, 256, 64, 8, 8, 3], [128, 128, 64, 8, 4, 3]

    def row(name, launch, schedule, us, loads="tma", status="ok"):
        return {"name": f"{name} {schedule}", "launch": launch, "schedule": schedule, "loads": loads, "us": us,
                "status": status}

    items = [row("fc1 triton linear_gelu", a, "tiles", 700.0), row("fc1 triton linear_gelu", b, "persistent", 650.0),
             row("fc1 triton linear_gelu", b, "tiles", 600.0, loads="ptr"),  # pointer loads are not taken
             row("fc1 triton linear_gelu", a, "persistent-ws", 1.0, status="error"),
             row("fc1 fp8 triton linear_gelu -> e4m3", a, "tiles", 400.0),
             row("fc1 fp8 triton linear_gelu -> e4m3", b, "tiles", 380.0),
             row("fc2 fp8 triton linear_residual", a, "tiles", 300.0),
             row("fc2 fp8 triton linear_residual", b, "tiles", 390.0),  # b is faster for fc1, slower in sum
             row("fc2 fp8 triton linear_residual", b, "persistent", 100.0)]  # no fc1 row of that form: not taken
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"items": items}))
    chosen = bench.use_fastest_launches(str(path))
    assert chosen == {"bf16": {"launch": b, "schedule": "persistent"}, "fp8": {"launch": a, "schedule": "tiles"}}
    assert triton_ops.LINEAR_LAUNCH == tuple(b) and triton_ops.LINEAR_SCHEDULE == "persistent"
    assert triton_ops.LINEAR_LAUNCH_FP8 == tuple(a) and triton_ops.LINEAR_SCHEDULE_FP8 == "tiles"
