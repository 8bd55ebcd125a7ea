"""Quantizing a slice and measuring it: the workflow above the format in ``elastic.slicer.quant``.

- ``workflow``: float slice -> quantized slice through Model Optimizer (optional dependency,
  ``pip install 'elastic[modelopt]'``), the unquantized tensors in bf16 and, for int4, the hidden
  width zero-padded to the AWQ group (``hidden_pad``);
- ``text``: bundled calibration and held-out text; ``evaluate``: perplexity on the held-out text.

Nothing here is imported by ``import elastic.slicer.quantize``.
"""
