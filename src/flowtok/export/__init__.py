"""Deployment outside PyTorch.

* :mod:`flowtok.export.onnx` writes every network of a pipeline folder as ONNX graphs plus a
  ``manifest.json`` that says how they fit together (needs torch, onnx and onnxscript).
* :mod:`flowtok.export.runtime` runs such a folder with onnxruntime, numpy, ``tokenizers`` and PIL
  only: ``OnnxFlowTokPipeline.from_pretrained(DIR).text_to_image(...)`` / ``.image_to_text(...)``.

This package imports nothing on its own, so that ``import flowtok.export.runtime`` never loads torch.
"""
