"""Zero-pad a float checkpoint's hidden size, so int4 (AWQ) can use a larger group.

A narrow budget's hidden size (the demo's 75%: 56) often has only a small power of two in it, and
int4's group must divide every quantized Linear's input: 8 for 56, whose float32 scales (one per 8
weights) then cost as much as the 4-bit weights and make the narrower budget larger than the wider
one. Padding the hidden size to 64 lets the group be 64: ``planning.memory.int4_hidden`` decides
(the fewest bytes), and the plan and ``elastic slice --precision int4`` both follow it.

Why it computes what the unpadded model computes: every added hidden channel is zero in the
embeddings, in the output rows of every projection that writes the residual stream (out_proj,
o_proj, down_proj, the experts' and shared expert's down projections, fc2 latent), so the residual
stream keeps zeros there; the input columns that read it (in_proj, q/k/v, up projections, the router,
fc1 latent, lm_head) are zero, so nothing reads them. The RMSNorms over the hidden size divide by
the number of channels: their weights are scaled by sqrt(d / d_padded), which gives the unpadded
result up to the epsilon (it is added to a mean over d_padded channels instead of d: a relative
difference of about eps / mean(x^2), far below int4's rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

from elastic.slicer.storage.writer import OutTensor


def hidden_axes(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of a tensor that grow with the hidden size (where its padded shape differs)."""
    return tuple(k for k, (a, b) in enumerate(zip(before, after)) if a != b)


def pad_hidden(src: str | Path, out: str | Path, hidden: int) -> Path:
    """Write the float checkpoint ``src`` into ``out`` with its hidden size zero-padded to ``hidden``
    (see the module docstring); config.json says the new size, tokenizer files are copied.

    Returns:
        ``out``.
    """
    import json

    import torch

    from elastic.slicer.slice import PASSTHROUGH_FILES
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    ckpt = Checkpoint.open(src, require_weights=True)
    arch = ckpt.arch
    d = arch.hidden_size
    assert hidden > d, f"padding {d} to {hidden}"
    before, after = arch.tensor_shapes(), arch.with_layers(arch.layers, hidden).tensor_shapes()
    scale = math.sqrt(d / hidden)

    def padded(name: str):
        t = ckpt.read(name)
        axes = hidden_axes(before[name], after[name])
        if not axes:
            return [t]
        out_t = torch.zeros(after[name], dtype=t.dtype)
        out_t[tuple(slice(0, n) for n in t.shape)] = t
        if name.split(".")[-2] in ("norm", "norm_f"):  # an RMSNorm over the hidden size (the layers' and the last)
            out_t[:d] *= scale
        return [out_t]

    config = json.loads((ckpt.root / "config.json").read_text())
    config["hidden_size"] = hidden
    with ShardedWriter(out, force=True, sources=[ckpt.root, *ckpt.weight_files], kind="slice") as w:
        w.add_json("config.json", config)
        w.add_files_from(ckpt.root, [*PASSTHROUGH_FILES, *(f.name for f in ckpt.root.glob("*.py"))])  # + remote code
        w.write_tensors([OutTensor(name, ckpt.tensors[name].dtype, after[name], lambda n=name: padded(n))
                         for name in before])
    return Path(out)
