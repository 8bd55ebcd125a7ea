"""The quantized checkpoint format (NVIDIA Model Optimizer's): what it holds, how it slices, what
loads it. Producing one (calibration through Model Optimizer) and measuring it is the workflow in
``elastic.slicer.quantize``.

- ``layout``: what a quantized checkpoint holds (no torch; ``Checkpoint.open`` uses it);
- ``dequant``: quantized tensors -> float weights and simulated input quantization (torch);
- ``slicing``: a quantized checkpoint's packed weights and scales cut along the slicing rules,
  without dequantizing (no torch; ``slice_checkpoint`` uses it);
- ``runtimes``: which runtimes load a quantized slice (no torch).

Nothing here is imported by ``import elastic.slicer.quant``.
"""
