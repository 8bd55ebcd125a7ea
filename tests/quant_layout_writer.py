"""Quantized checkpoints written straight in Model Optimizer's documented layout (slicer/quant/layout.py),
for models Model Optimizer does not quantize here (transformers' merged MoE experts): every Linear
but ``lm_head`` quantized, per tensor (FP8) or in NVFP4's 16-value blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from elastic.slicer.quant.layout import linear_modules
from elastic.slicer.storage.reader import Checkpoint

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # fp4 magnitudes by code 0..7; bit 3 = sign


def _fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = w.abs().max().clamp(min=1e-12) / 448.0
    return {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale.reshape(()),
            "input_scale": torch.tensor(0.05)}


def _nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    out, inp = w.shape
    scale2 = w.abs().max().clamp(min=1e-12) / (6.0 * 448.0)
    blocks = w.view(out, inp // 16, 16)
    block_scale = (blocks.abs().amax(-1) / 6.0 / scale2).to(torch.float8_e4m3fn)  # (out, in/16)
    x = blocks / (block_scale.float().clamp(min=1e-12)[..., None] * scale2)
    code = (x.abs()[..., None] - E2M1).abs().argmin(-1) | ((x < 0).to(torch.long) << 3)  # nearest value, sign
    code = code.view(out, inp).to(torch.uint8)
    return {"weight": code[:, 0::2] | (code[:, 1::2] << 4), "weight_scale": block_scale,
            "weight_scale_2": scale2.reshape(()), "input_scale": torch.tensor(0.05)}


def write_quantized_layout(src: Path, out: Path, algo: str) -> Path:
    """A copy of the float checkpoint ``src`` (its elastic files too) with its Linears in ``algo``."""
    ckpt = Checkpoint.open(src)
    linears = set(linear_modules(ckpt.arch.tensor_shapes())) - {"lm_head"}
    tensors = {}
    for name in ckpt.tensors:
        t = ckpt.read(name).float() if ckpt.tensors[name].dtype != "F32" else ckpt.read(name)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in linears:
            for leaf, q in (_fp8 if algo == "FP8" else _nvfp4)(t.float()).items():
                tensors[f"{module}.{leaf}"] = q.contiguous()
        else:
            tensors[name] = t.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors")
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors") and f.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    section = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"],
               **({"group_size": 16} if algo == "NVFP4" else {})}
    config["quantization_config"] = {"quant_method": "modelopt", **section}
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.47.0"},
                                                          "quantization": section}, indent=2))
    return out
