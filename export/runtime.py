"""Running a model: ONNX Runtime over an export directory, or the PyTorch reference over a model directory.

Example:
    >>> gen = OnnxGenerator("./model-50-onnx")
    >>> out = gen.generate(np.array([[72, 101, 108, 108, 111]]), max_new_tokens=16)  # (1, 5 + 16)
    >>> generate_text("./model-50-onnx", "Hello", backend="onnx")["text"]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from elastic.slicer.errors import ElasticError

from .deps import require
from .layout import DECODE, PAST, PREFILL, PRESENT

BACKENDS = ("torch", "onnx")


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / PREFILL).is_file() and (Path(path) / DECODE).is_file()


class OnnxGenerator:
    """Greedy decoding with the exported graphs: one prefill, then one decode step per token.

    The state is a dict ``name -> array`` with the graph's state names without prefix
    (``conv_state.0``, ``key.3``...): prefill's ``present_*`` outputs become decode's ``past_*`` inputs.

    Args:
        export_dir: a directory written by ``elastic export`` (prefill.onnx + decode.onnx).
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
        session_config: ONNX Runtime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` on a machine shared with other work.
    """

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        require("onnxruntime")
        import onnxruntime as ort

        self.dir = Path(export_dir)
        if not is_export_dir(self.dir):
            raise ElasticError(f"not an ONNX export: {PREFILL} and {DECODE} are expected here "
                               "(write them with `elastic export MODEL_DIR --out DIR`)", path=str(self.dir))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, value)
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.prefill_session = ort.InferenceSession(str(self.dir / PREFILL), opts, providers=providers)
            self.decode_session = ort.InferenceSession(str(self.dir / DECODE), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ElasticError(f"ONNX Runtime cannot load the graphs ({type(e).__name__}: {e})",
                               path=str(self.dir)) from None
        self.prefill_outputs = [o.name for o in self.prefill_session.get_outputs()]
        self.decode_outputs = [o.name for o in self.decode_session.get_outputs()]
        self.state_names = [i.name.removeprefix(PAST) for i in self.decode_session.get_inputs() if i.name != "input_ids"]
        self.vocab_size = int(self.prefill_session.get_outputs()[0].shape[-1])

    def _state(self, names: list[str], outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {n.removeprefix(PRESENT): v for n, v in zip(names[1:], outs[1:])}

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits (b, l, vocab) float32, state) for prompt ids (b, l)."""
        outs = self.prefill_session.run(None, {"input_ids": np.asarray(input_ids, dtype=np.int64)})
        return outs[0], self._state(self.prefill_outputs, outs)

    def step(self, next_ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits (b, 1, vocab), new state) for one token per sequence, ids (b,) or (b, 1)."""
        feed = {"input_ids": np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)}
        feed.update({PAST + n: state[n] for n in self.state_names})
        outs = self.decode_session.run(None, feed)
        return outs[0], self._state(self.decode_outputs, outs)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Same contract as ``elastic.slicer.nn.model.generate``: (b, prompt + generated) ids, greedy, stops
        early once every row has produced ``eos_token_id``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        logits, state = self.prefill(input_ids)
        out = [input_ids]
        done = np.zeros(input_ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt[:, None])
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if done.all():
                    break
            logits, state = self.step(nxt, state)
        return np.concatenate(out, axis=1)


def _eos(path: Path) -> int | None:
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return None
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def generate_text(path: str | Path, prompt: str, *, backend: str | None = None, max_new_tokens: int = 32,
                  threads: int | None = None) -> dict[str, Any]:
    """Greedy generation from a model directory (PyTorch) or an export directory (ONNX Runtime), timed.

    Args:
        path: a model directory (config.json + safetensors) for ``torch``, an export directory for ``onnx``.
        backend: "torch" or "onnx"; None picks "onnx" for an export directory, else "torch".
        max_new_tokens: tokens to generate; stops early at the config's ``eos_token_id``.

    Returns:
        ``backend``, ``prompt_tokens``, ``tokens`` (generated ids), ``text`` (None when the ids
        cannot be decoded), ``new_tokens``, ``prefill_s``, ``decode_s``, ``tokens_per_s`` (decode).
    """
    from elastic.slicer.nn.smoke import encode_prompt

    path = Path(path)
    backend = backend or ("onnx" if is_export_dir(path) else "torch")
    if backend not in BACKENDS:
        raise ElasticError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    eos = _eos(path)
    if backend == "onnx":
        gen = OnnxGenerator(path, threads=threads)
        ids, decode = encode_prompt(path, prompt, gen.vocab_size)
        x = np.array([ids or [0]], dtype=np.int64)
        t0 = time.perf_counter()
        logits, state = gen.prefill(x)
        t1 = time.perf_counter()
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            tokens.append(int(nxt[0]))
            if eos is not None and tokens[-1] == eos:
                break
            logits, state = gen.step(nxt, state)
        t2 = time.perf_counter()
    else:
        from elastic.slicer.nn.smoke import smoke_test

        if threads:
            import torch

            torch.set_num_threads(threads)
        return smoke_test(path, prompt, max_new_tokens, eos_token_id=eos)
    return {
        "backend": backend,
        "path": str(path),
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "tokens": tokens,
        "text": decode(tokens) if decode else None,
        "new_tokens": len(tokens),
        "prefill_s": round(t1 - t0, 4),
        "decode_s": round(t2 - t1, 4),
        "tokens_per_s": round(len(tokens) / (t2 - t1), 1) if tokens and t2 > t1 else None,
    }
