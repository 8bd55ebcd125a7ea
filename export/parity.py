"""ONNX Runtime against the PyTorch reference: logits, state and greedy tokens (DESIGN.md section 8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from elastic.slicer.nn.model import NemotronH, generate

from .graphs import cache_tensors, state_tensors
from .runtime import OnnxGenerator

TOLERANCE = 1e-4  # max |logit difference| accepted for float32 graphs
# Q/DQ graphs against the dequantizing reference (load_model). The arithmetic is the same, but the
# float32 sums before an activation QuantizeLinear differ in the last bits between the runtimes
# (summation order; ONNX Runtime may also fuse Q/DQ + MatMul into integer kernels), and a value on a
# rounding boundary then lands one quantization step away: one int8 step is input_scale, one fp8
# step up to 1/16 of the value. Such a flip moves the logits by about a step times a weight, far above
# 1e-4 but below a wrong graph (a wrong scale, axis or nibble order moves every logit by O(1)). Seen:
# the demo's 75% int8 slice, max |diff| 7.2e-2 and mean 4.3e-3 (the Mamba state carries one early
# flip to every later position). So a Q/DQ export is accepted when the greedy tokens are identical,
# the largest difference stays below QDQ_TOLERANCE and the mean difference below QDQ_MEAN_TOLERANCE.
QDQ_TOLERANCE = 0.25
QDQ_MEAN_TOLERANCE = 2e-2


def shared_model(arch, views: dict[str, np.ndarray], get, dtype: torch.dtype) -> NemotronH:
    """The reference model over the export's own weights: every parameter the graphs keep in
    ``weights.bin`` is a view of ``views`` (the memory map ONNX Runtime reads too: no copy), the few
    the optimiser folded into the graphs come from ``get(name)``."""
    import warnings

    from elastic.slicer.nn.model import build_model

    from .layout import param_of

    model = build_model(arch, dtype=dtype, device="meta")
    params = dict(model.named_parameters())
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the read-only map is not writable; nothing writes
        for name, view in views.items():
            param, transposed = param_of(name)
            t = torch.from_numpy(view)
            state[param] = t.t() if transposed else t
    for name in params:
        if name not in state:
            state[name] = get(name).to(dtype)
    for name, t in state.items():
        module_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), leaf, torch.nn.Parameter(t, requires_grad=False))
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()


def _diffs(a: np.ndarray, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |a - b|, from one difference array."""
    if not a.size:
        return 0.0, 0.0
    d = np.abs(a.astype(np.float64) - b.double().numpy())
    return float(d.max()), float(d.mean())


@torch.no_grad()
def check_parity(model: NemotronH, export_dir: str | Path, *, batch: int = 2, prompt_len: int | None = None,
                 decode_steps: int = 4, new_tokens: int = 8, tolerance: float = TOLERANCE,
                 mean_tolerance: float | None = None, seed: int = 0,
                 generator: OnnxGenerator | None = None) -> dict[str, Any]:
    """Run the same random prompt through ``model`` and the graphs in ``export_dir``.

    Prefill logits and every state tensor; the same prompt prefilled in chunks (``extend.onnx``;
    the last position's logits and the state), then ``decode_steps`` decode steps fed the reference's
    greedy tokens (so a near-tie cannot make the two diverge and hide a real difference), then
    ``elastic.slicer.nn.model.generate`` against :meth:`OnnxGenerator.generate` for ``new_tokens`` tokens.

    Args:
        prompt_len: default 2 chunks + 3 tokens, so the chunked scan crosses chunks and pads.

    Returns:
        ``prefill_max_abs_diff``, ``state_max_abs_diff``, ``decode_max_abs_diff`` (logits, over all
        steps), ``chunked_prefill_max_abs_diff`` (None without ``extend.onnx``), ``greedy_tokens_equal``,
        ``tolerance``, ``ok`` (all diffs <= tolerance and the same tokens), and the sizes used.
    """
    gen = generator or OnnxGenerator(export_dir)
    arch = model.arch
    prompt_len = prompt_len or 2 * arch.chunk_size + 3
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch.vocab_size, (batch, prompt_len), generator=g)

    states = state_tensors(arch)
    cache = model.new_cache()
    ref_logits = model(ids, cache=cache)  # NemotronH.forward itself, not the export wrappers
    logits, state = gen.prefill(ids.numpy(), all_logits=True)  # prefill.onnx: every position
    ref_states = cache_tensors(cache, states)

    def states_diff(got: dict[str, np.ndarray]) -> float:
        return max((_diffs(got[s.name], t)[0] for s, t in zip(states, ref_states)), default=0.0)

    prefill_diff, mean_diff = _diffs(logits, ref_logits)
    state_diff = states_diff(state)
    chunked_diff = None
    if gen.extend_session is not None:  # the chunked prefill: extend.onnx from an empty state, then decode.onnx
        logits, chunked = gen.prefill(ids.numpy(), chunk=arch.chunk_size + 1)  # pieces c+1, c+1, 1
        chunked_diff = max(_diffs(logits, ref_logits[:, -1:])[0], states_diff(chunked))

    decode_diff = 0.0
    for _ in range(decode_steps):
        nxt = ref_logits[:, -1].argmax(-1)
        ref_logits = model(nxt[:, None], cache=cache)
        logits, state = gen.step(nxt.numpy(), state)
        step_max, step_mean = _diffs(logits, ref_logits)
        decode_diff, mean_diff = max(decode_diff, step_max), max(mean_diff, step_mean)

    torch_tokens = generate(model, ids, new_tokens)[:, prompt_len:]
    onnx_tokens = gen.generate(ids.numpy(), new_tokens)[:, prompt_len:]
    same = torch_tokens.shape == onnx_tokens.shape and bool((torch_tokens.numpy() == onnx_tokens).all())
    return {
        "prefill_max_abs_diff": prefill_diff,
        "state_max_abs_diff": state_diff,
        "decode_max_abs_diff": decode_diff,
        "chunked_prefill_max_abs_diff": chunked_diff,  # last logits and state; None: no extend.onnx
        "greedy_tokens_equal": same,
        "torch_tokens": torch_tokens.tolist(),
        "onnx_tokens": onnx_tokens.tolist(),
        "tolerance": tolerance,
        "mean_abs_diff": mean_diff,  # the largest mean |logit diff| of prefill and the decode steps
        "mean_tolerance": mean_tolerance,
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
        "ok": (max(prefill_diff, state_diff, decode_diff, chunked_diff or 0.0) <= tolerance and same
               and (mean_tolerance is None or mean_diff <= mean_tolerance)),
    }
