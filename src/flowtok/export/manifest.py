"""Names shared by the exporter, the runtime and the browser page (no imports: torch-free)."""

MANIFEST = "manifest.json"
FORMAT = "flowtok-onnx"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
TEXT_TOKENIZER_FILE = "tokenizer.json"
# Graphs whose int8 version keeps the shapes benchmark's accuracy (docs/benchmarks.md, "ONNX").
# int8 of the image encoder or the I2T flow halves caption accuracy (97% -> 38% / 71%), so those stay fp16.
INT8_GRAPHS: tuple[str, ...] = ("text_encoder", "text_projector", "t2i_flow", "image_decoder", "text_decoder")
