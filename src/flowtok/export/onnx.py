"""``flowtok export onnx``: every network of a pipeline folder as ONNX graphs, and a manifest.

The graphs (dynamic batch, opset 18, exported with ``torch.onnx.export(dynamo=True)``)::

    text_encoder    input_ids [B, L] int64, attention_mask [B, L] int64   -> states [B, L, D]
    text_projector  states [B, L, D]                                -> latent_mean, latent_logvar [B, L, C]
    t2i_flow        x [B, K, C], t [B] float32, null_indicator [B] int64   -> velocity [B, K, C]
    i2t_flow        (as t2i_flow)
    image_encoder   images [B, 3, H, W] in [0, 1]                          -> latents [B, K, C] (posterior mode, unscaled)
    image_decoder   latents [B, K, C] unscaled (+ text_states [B, L, D] when the decoder reads text)
                                                                           -> images [B, 3, H, W], unclamped
    text_decoder    text_latents [B, L, C]                                 -> logits [B, L, V]

Everything between them (tokenising, the projector's reparameterisation, the Euler loop with
classifier-free guidance, the latent scale factor, clamping, argmax and detokenising, or the caption
grammar's decoding where the defaults name one: its table goes into ``manifest.json`` as
``"caption_grammar"``) is plain arithmetic that :mod:`flowtok.export.runtime` (and the browser page) do
from ``manifest.json``.

Precisions, one file each:

* ``fp32``: the reference.
* ``fp16``: the same graph with its float weights stored as float16 and cast to float32 when the
  session starts, so it runs on every onnxruntime backend (CPU and WebAssembly have few float16
  kernels) at half the download. The bundled model's weights are float16 already and the small
  derived tables (RoPE, sin-cos) stay float32, so for its own networks this is lossless; only the
  MiniLM text encoder (float32 upstream) is rounded.
* ``int8``: dynamic quantisation of the MatMul / Gemm weights (onnxruntime's ``quantize_dynamic``),
  remaining float weights stored as float16. Written only for the graphs in :data:`INT8_GRAPHS`,
  those where it keeps the shapes benchmark's accuracy (measured in docs/benchmarks.md).

Each written graph is run in onnxruntime against the PyTorch module at two batch sizes; the
largest absolute difference goes into the manifest, and an fp32 graph that disagrees is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..config import atomic_write_text
from ..errors import CheckpointError, InvalidInputError
from .manifest import FORMAT, FORMAT_VERSION, INT8_GRAPHS, MANIFEST, PRECISIONS, TEXT_TOKENIZER_FILE

if TYPE_CHECKING:
    from ..tokenizer import ImageTokenizer

log = logging.getLogger(__name__)

OPSET = 18
# fp32 graphs must agree with PyTorch to this (absolute, on outputs of order 1); anything larger is a bug.
FP32_TOLERANCE = 1e-3

# Float tensors smaller than this that float16 cannot hold exactly stay float32 in the fp16 graphs.
_FP16_KEEP_BELOW = 65536
# transformers' ``clean_up_tokenization`` (what ``decode(..., clean_up_tokenization_spaces=True)`` does
# after the WordPiece decoder), written out so that the runtime and the page need no transformers.
_HF_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
               (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class _TextEncoderGraph(nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered, so the exporter sees the weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder._forward(input_ids, attention_mask).float()


class _ProjectorGraph(nn.Module):
    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.projector(states, None, sample=False)
        return out.mean, out.logvar


class _FlowGraph(nn.Module):
    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, t: torch.Tensor, null_indicator: torch.Tensor) -> torch.Tensor:
        return self.flow(x, t, null_indicator)


class _ImageEncoderGraph(nn.Module):
    def __init__(self, tokenizer: ImageTokenizer) -> None:
        super().__init__()
        self.encoder = tokenizer.encoder
        self.channels = tokenizer.config.token_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[..., : self.channels]  # the posterior's mean: what encode() returns


class _ImageDecoderGraph(nn.Module):
    def __init__(self, tokenizer: ImageTokenizer) -> None:
        super().__init__()
        self.decoder = tokenizer.decoder

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(latents, text_states)


class _TextDecoderGraph(nn.Module):
    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, text_latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(text_latents)


Inputs = Callable[[int], tuple[torch.Tensor, ...]]


def _flow_inputs(fk: int, fc: int, gen: torch.Generator) -> Inputs:
    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, fk, fc, generator=gen), torch.rand(b, generator=gen),
                torch.randint(0, 2, (b,), generator=gen))
    return inputs


def _graph_table(pipe: Any) -> dict[str, tuple[nn.Module, Inputs, list[str], list[str]]]:
    """name -> (module, example inputs for a batch size, input names, output names)."""
    tok = pipe.image_tokenizer
    enc = pipe.text_encoder
    k, c = tok.config.num_latent_tokens, tok.config.token_channels
    length, dim = enc.max_length, enc.dim
    size = tok.config.image_size
    gen = torch.Generator().manual_seed(0)

    def ids(b: int) -> tuple[torch.Tensor, ...]:
        lengths = torch.randint(3, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        return torch.randint(1000, enc.vocab_size, (b, length), generator=gen) * mask, mask

    table: dict[str, tuple[nn.Module, Inputs, list[str], list[str]]] = {
        "text_encoder": (_TextEncoderGraph(enc), ids, ["input_ids", "attention_mask"], ["states"]),
        "text_projector": (_ProjectorGraph(pipe.text_projector),
                           lambda b: (torch.randn(b, length, dim, generator=gen),), ["states"], ["latent_mean", "latent_logvar"]),
        "image_encoder": (_ImageEncoderGraph(tok), lambda b: (torch.rand(b, 3, size, size, generator=gen),),
                          ["images"], ["latents"]),
    }
    if tok.reads_text:
        tl, td = tok.config.text_len, tok.config.text_dim
        table["image_decoder"] = (_ImageDecoderGraph(tok), lambda b: (torch.randn(b, k, c, generator=gen),
                                                                       torch.randn(b, tl, td, generator=gen)),
                                  ["latents", "text_states"], ["images"])
    else:
        table["image_decoder"] = (_ImageDecoderGraph(tok), lambda b: (torch.randn(b, k, c, generator=gen),),
                                  ["latents"], ["images"])
    for name in ("t2i_flow", "i2t_flow"):
        flow = getattr(pipe, name)
        if flow is not None:
            table[name] = (_FlowGraph(flow), _flow_inputs(flow.config.num_tokens, flow.config.in_channels, gen),
                           ["x", "t", "null_indicator"], ["velocity"])
    if pipe.text_decoder is not None:
        dk, dc = pipe.text_decoder.config.num_tokens, pipe.text_decoder.config.latent_channels
        table["text_decoder"] = (_TextDecoderGraph(pipe.text_decoder),
                                 lambda b: (torch.randn(b, min(dk, length), dc, generator=gen),),
                                 ["text_latents"], ["logits"])
    return table


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints its progress to stdout and warns about optional packages (torchvision)."""
    # onnxruntime's quantiser logs on the root logger, hence "" among the names.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript",
                                              "onnx_ir", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_graph(module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in inputs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _quiet_exporter():
        torch.onnx.export(module, inputs, str(tmp), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic, opset_version=OPSET,
                          external_data=False, verbose=False)
    import onnx

    # The exporter names values after the Python variables; an output name that collides with one
    # breaks single assignment, which onnxruntime may not notice but other runtimes refuse.
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)


def weights_to_fp16(model: Any) -> Any:
    """The same graph with every float32 initializer stored as float16 and cast back to float32 by a
    ``Cast`` node: half the bytes, float32 arithmetic (onnxruntime folds the casts when a session starts)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    # An initializer that is also a graph input or output keeps its type (the Cast would clash with it).
    taken = {v.name for v in graph.input} | {v.name for v in graph.output}
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in taken:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < 2 or not np.isfinite(arr).all() or np.abs(arr).max() > np.finfo(np.float16).max:
            continue  # scalars gain nothing; out-of-range values would become inf
        if arr.size < _FP16_KEEP_BELOW and not np.array_equal(arr.astype(np.float16).astype(np.float32), arr):
            continue  # a small table float16 would round (RoPE, sin-cos, a norm's weights): costs little to keep
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    return model


def _quantize_int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with _quiet_exporter():
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    onnx.save(weights_to_fp16(onnx.load(str(tmp))), str(tmp))
    os.replace(tmp, dst)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def _max_abs_diff(path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str]) -> float:
    session = _session(path)
    got = session.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})
    want = module(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.float().numpy()).max()) for g, w in zip(got, want))


def _text_section(pipe: Any, out: Path) -> dict[str, Any]:
    """The text tokenizer as a ``tokenizers`` file plus everything needed to build rows and clean captions."""
    from ..text.clip_tokenizer import _DETOK, _DIGITS
    from ..text.encoders import MiniLMTextEncoder

    enc = pipe.text_encoder
    if not isinstance(enc, MiniLMTextEncoder):
        raise InvalidInputError(f"ONNX export supports the MiniLM text encoder only; this pipeline uses "
                                f"{enc.spec.get('name')!r}")
    from tokenizers import Tokenizer

    # The backend transformers itself runs, so normalisation and splitting are the encoder's own;
    # rows are padded and truncated by flowtok's rule (BOS, content, EOS, pads), not the file's.
    backend = Tokenizer.from_str(enc.tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    atomic_write_text(out / TEXT_TOKENIZER_FILE, backend.to_str(pretty=False))
    return {"tokenizer": TEXT_TOKENIZER_FILE, "kind": "wordpiece", "max_length": enc.max_length, "dim": enc.dim,
            "vocab_size": enc.vocab_size, "bos_token_id": enc.bos_token_id, "eos_token_id": enc.eos_token_id,
            "pad_token_id": enc.pad_token_id, "lowercase": True,
            "decode_replacements": [list(p) for p in _HF_CLEANUP + _DETOK],
            "decode_join_digits": _DIGITS.pattern}


def _grammar_section(pipe: Any) -> dict[str, Any]:
    """The caption grammar the pipeline's defaults name, as the table the runtime and the page decode with."""
    if pipe.defaults.caption_grammar != "shapes":
        return {}
    from ..shapes.grammar import shapes_grammar

    return {"caption_grammar": shapes_grammar(pipe.text_encoder).to_json()}


def export_onnx(model: str | os.PathLike | None, out: str | os.PathLike, precisions: Sequence[str] = PRECISIONS,
                int8_graphs: Sequence[str] = INT8_GRAPHS, verify: bool = True) -> Path:
    """Export the pipeline folder ``model`` (None: the bundled one) to ``out``; returns the manifest path."""
    from .. import __version__
    from ..pipelines import FlowTokPipeline

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "fp32" not in precisions:
        raise InvalidInputError(f"precisions must include fp32 and be among {', '.join(PRECISIONS)}; got {list(precisions)}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{root} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create {root}: {exc.strerror or type(exc).__name__}") from None
    pipe = FlowTokPipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    text = _text_section(pipe, root)
    tok = pipe.image_tokenizer
    graphs: dict[str, Any] = {}
    for name, (module, make_inputs, in_names, out_names) in _graph_table(pipe).items():
        start = time.perf_counter()
        module.eval()
        files = {"fp32": f"{name}.onnx"}
        _export_graph(module, make_inputs(2), in_names, out_names, root / files["fp32"])
        if "fp16" in precisions:
            import onnx

            files["fp16"] = f"{name}.fp16.onnx"
            tmp = root / f".{files['fp16']}.tmp-{os.getpid()}"
            onnx.save(weights_to_fp16(onnx.load(str(root / files["fp32"]))), str(tmp))
            os.replace(tmp, root / files["fp16"])
        if "int8" in precisions and name in int8_graphs:
            files["int8"] = f"{name}.int8.onnx"
            _quantize_int8(root / files["fp32"], root / files["int8"])
        entry: dict[str, Any] = {"files": files, "inputs": in_names, "outputs": out_names,
                                 "bytes": {p: (root / f).stat().st_size for p, f in files.items()}}
        if verify:
            entry["max_abs_diff"] = {}
            for batch in (1, 3):
                inputs = make_inputs(batch)
                for precision, file in files.items():
                    diff = _max_abs_diff(root / file, module, inputs, in_names)
                    entry["max_abs_diff"][precision] = max(diff, entry["max_abs_diff"].get(precision, 0.0))
            if not entry["max_abs_diff"]["fp32"] <= FP32_TOLERANCE:
                raise CheckpointError(f"the exported {name} graph differs from PyTorch by "
                                      f"{entry['max_abs_diff']['fp32']:.3g}; the export is wrong")
        graphs[name] = entry
        log.info("exported %s (%s) in %.1f s", name, ", ".join(files), time.perf_counter() - start)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "flowtok_version": __version__, "opset": OPSET,
        "source": pipe.model_path.name if pipe.model_path else None,
        "graphs": graphs,
        "text": text,
        "image": {"size": tok.config.image_size, "range": [0.0, 1.0], "layout": "NCHW RGB",
                  "resize": "shorter side to size (bicubic), centre crop; transparency over white"},
        "image_latent": {"tokens": tok.config.num_latent_tokens, "channels": tok.config.token_channels,
                         "scale_factor": tok.scale_factor, "decoder_reads_text": tok.reads_text},
        "text_latent": {"tokens": text["max_length"], "channels": pipe.text_projector.config.latent_channels},
        "defaults": dataclasses.asdict(pipe.defaults),
        **_grammar_section(pipe),
        "sampler": {"method": "euler", "grid": "t_i = i / N", "guidance": "v_null + s * (v_cond - v_null)",
                    "null_indicator": "0 = conditional, 1 = null; s == 1 runs the conditional branch alone"},
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return root / MANIFEST

