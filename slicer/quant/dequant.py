"""Model Optimizer's quantized Linear tensors -> float weights and the input quantizer each Linear
needs, so the reference model computes what Model Optimizer's simulated quantization computes.
Torch only; no modelopt import (its export code is the spec: modelopt/torch/export/quant_utils.py
``to_quantized_weight`` / ``pack_int4_in_uint8``, qtensor/nvfp4_tensor.py ``NVFP4QTensor``).

- fp8: ``weight (F8_E4M3) * weight_scale``;
- int8 (SmoothQuant) and int8_wo: ``weight (I8) * weight_scale[out]`` per output channel;
- int4 AWQ: nibbles unpacked (byte row k holds rows 2k (low) and 2k+1 (high), signed 4-bit),
  times the group scale ``weight_scale[out, in // group]``, and AWQ's ``pre_quant_scale`` folded
  into the input columns (``x * s @ W.T == x @ (W * s).T``);
- nvfp4: e2m1 codes (byte column j holds columns 2j (low) and 2j+1 (high)) times the fp8 block
  scale ``weight_scale[out, in // 16]`` times ``weight_scale_2``.

W8A8 formats also quantize the Linear's input at run time with the static ``input_scale``;
:class:`InputQuant` simulates that (quantize-dequantize), after SmoothQuant's ``pre_quant_scale``.

Example:
    >>> w, iq = dequantize(layout, {"weight": q, "weight_scale": s, "input_scale": a})  # fp8
    >>> y = F.linear(iq(x), w)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic.slicer.quant.layout import QuantLayout

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # int8 activations: [-128, 127] (Model Optimizer's input quantizers are not narrow-range)
# e2m1 (fp4) values by 4-bit code; bit 3 is the sign (NVFP4QTensor.e2m1_values)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class InputQuant:
    """Simulated quantization of a Linear's input: ``x * pre_quant_scale``, then fake-quantized to
    ``kind`` ("fp8" / "int8") with the per-tensor ``scale``."""

    kind: str
    scale: float
    pre_quant_scale: torch.Tensor | None  # (in,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_input(x, self.kind, self.scale, self.pre_quant_scale)


def fake_quant_input(x: torch.Tensor, kind: str, scale: float,
                     pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (after ``* pre_quant_scale``) as Model Optimizer's static input
    quantizer does (tensor_quant.py: ``_fp8_eager``, ``_tensor_quant``), in float32."""
    dtype = x.dtype
    xf = x.float()
    if pre_quant_scale is not None:
        xf = xf * pre_quant_scale.float()
    if kind == "fp8":  # scale, clamp to the finite range, round to e4m3, scale back
        xf = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    elif kind == "int8":  # round half to even, full range
        xf = (xf / scale).round().clamp(-INT8_MAX - 1, INT8_MAX) * scale
    else:
        raise AssertionError(f"unknown input quantization {kind!r}")
    return xf.to(dtype)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """(out/2, in) uint8 -> (out, in) int8 in [-8, 7]: byte row k holds rows 2k (low nibble), 2k+1 (high)."""
    p = packed.to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    rows = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])  # (out, in): 2k, 2k+1 interleaved
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)


def unpack_fp4_columns(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) float32 e2m1 values: byte column j holds columns 2j (low), 2j+1 (high)."""
    p = packed.to(torch.int64)
    codes = torch.stack([p & 0x0F, (p >> 4) & 0x0F], dim=-1).reshape(packed.shape[0], -1)  # (out, in)
    return torch.tensor(E2M1, dtype=torch.float32)[codes]


def dequantize_module(ckpt, module: str) -> tuple[torch.Tensor, InputQuant | None]:
    """:func:`dequantize` of the quantized Linear ``module`` of the Checkpoint ``ckpt``, its tensors
    ("weight", "weight_scale", ...) read from the checkpoint."""
    stem = module + "."
    leaves = {n[len(stem):]: n for n in ckpt.tensors if n.startswith(stem) and "." not in n[len(stem):]}
    return dequantize(ckpt.quant, {leaf: ckpt.read(n) for leaf, n in leaves.items()})


def dequantize(layout: QuantLayout, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, InputQuant | None]:
    """The float32 weight (out, in) of one quantized Linear and its input quantizer.

    Args:
        layout: the checkpoint's layout (format, group size).
        t: the Linear's tensors by leaf name ("weight", "weight_scale", ...), as stored.

    Returns:
        (weight, input quantizer or None when the input runs unchanged).
    """
    fmt = layout.format
    algo = fmt.quant_algo
    scale = t["weight_scale"].float()
    if algo == "FP8":
        w = t["weight"].float() * scale
    elif algo in ("W8A8_SQ_PER_CHANNEL", "W8A16"):
        w = t["weight"].float() * scale[:, None]  # (out, in) * (out, 1)
    elif algo == "W4A16_AWQ":
        q = unpack_int4_rows(t["weight"]).float()  # (out, in)
        w = q * scale.repeat_interleave(layout.group_size, dim=1)  # (out, in/g) -> (out, in)
    else:  # NVFP4
        block = scale.repeat_interleave(layout.group_size, dim=1)  # fp8 block scales, (out, in)
        w = unpack_fp4_columns(t["weight"]) * block * t["weight_scale_2"].float()
    pqs = t.get("pre_quant_scale")
    if fmt.activations is None:
        if pqs is not None:  # weight-only: the smoothing folds into the weight's input columns
            w = w * pqs.float()[None, :]
        return w, None
    return w, InputQuant(fmt.activations, float(t["input_scale"].float()), pqs)
