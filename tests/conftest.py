"""Fixtures shared by test files."""

import pytest


@pytest.fixture(scope="session")
def bundled_onnx(tmp_path_factory):
    """The bundled model exported once per test session (fp32 + fp16, each graph checked against PyTorch)."""
    from flowtok.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("bundled-onnx")
    export_onnx(None, out, precisions=("fp32", "fp16"))
    return out
