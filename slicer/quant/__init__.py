"""Quantized slices: NVIDIA Model Optimizer checkpoints written, validated and run.

- ``layout``: what a quantized checkpoint holds (no torch; ``Checkpoint.open`` uses it);
- ``dequant``: quantized tensors -> float weights and simulated input quantization (torch);
- ``slicing``: a quantized checkpoint's packed weights and scales cut along the slicing rules,
  without dequantizing (no torch; ``slice_checkpoint`` uses it);
- ``quantize``: float slice -> quantized slice through Model Optimizer (optional dependency,
  ``pip install 'elastic[modelopt]'``);
- ``runtimes``: which runtimes load a quantized slice (no torch);
- ``text``: bundled calibration and held-out text; ``evaluate``: perplexity on the held-out text.

Nothing here is imported by ``import elastic.slicer.quant``.
"""
