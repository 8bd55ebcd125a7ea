"""Running a model: ONNX Runtime over an export directory, or the PyTorch reference over a model directory.

Example:
    >>> gen = OnnxGenerator("./model-50-onnx")
    >>> out = gen.generate(np.array([[72, 101, 108, 108, 111]]), max_new_tokens=16)  # (1, 5 + 16)
    >>> generate_text("./model-50-onnx", "Hello", backend="onnx")["text"]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from elastic.slicer.errors import ElasticError

from .deps import require
from .layout import DECODE, ENGINE_META, EXTEND, MANIFEST, PAST, PREFILL, PRESENT
from .weights import external_initializers, mapped_weights

BACKENDS = ("torch", "onnx", "llama.cpp")
PREFILL_CHUNK = 512  # tokens: ONNX Runtime prefills a longer prompt in chunks of this many (as llama.cpp's batch)


_ARENA: list[bool] = []  # whether this process registered its shared arena (once)


def shared_arena(ort: Any) -> bool:
    """Register one CPU arena in ONNX Runtime's environment, once per process, for every session that
    asks for the environment's allocators; True once it is there. ONNX Runtime's defaults: a BFC
    arena of regions from 1 MiB, each new one twice the last (onnxruntime/core/framework/bfc_arena.cc,
    kNextPowerOfTwo); what it holds stays in it for the process's life. False where this ONNX Runtime
    cannot register one: each session then allocates from malloc."""
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
            _ARENA.append(True)
        except Exception:  # an older ONNX Runtime, or one built without the API
            _ARENA.append(False)
    return _ARENA[0]


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / PREFILL).is_file() and (Path(path) / DECODE).is_file()


class OnnxGenerator:
    """Greedy decoding with the exported graphs: one prefill, then one decode step per token; a
    backend of ``elastic.slicer.nn.generate.greedy``.

    A prompt is prefilled by ``extend.onnx`` from an empty state, in chunks of ``prefill_chunk``
    tokens (a last chunk of one token: ``decode.onnx``), and only the last position's logits are
    computed. ONNX Runtime then holds one chunk's activations (attention over the chunk x the tokens so
    far) instead of the whole prompt's (attention over the prompt x the prompt, and every position's
    logits: 64 MiB per 512 tokens at a vocabulary of 32,768). ``prefill(ids, all_logits=True)`` runs
    ``prefill.onnx`` over the whole prompt instead (every position's logits, as the parity check
    compares them); an export written before ``extend.onnx`` existed always does.

    The state is a dict ``name -> array`` with the graph's state names without prefix
    (``conv_state.0``, ``key.3``...): prefill's ``present_*`` outputs become decode's ``past_*`` inputs.

    Args:
        export_dir: a directory written by ``elastic export`` (prefill.onnx + decode.onnx).
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
        session_config: ONNX Runtime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` on a machine shared with other work.
        share_weights: every session uses one read-only memory map of ``weights.bin`` (given to ONNX
            Runtime as its initializers, with weight prepacking off so nothing is copied): the
            weights are in memory once, not once per graph. False lets each session load and
            prepack its own copy (faster matrix products on some CPUs, a copy per graph).
        memory_arena: one ONNX Runtime CPU memory arena for the whole process, shared by every
            session (registered once in ONNX Runtime's environment, :func:`shared_arena`); False:
            every tensor from malloc. Either way each tensor has its own buffer, freed after its last
            use (ONNX Runtime's buffer reuse is off: it hands a freed buffer to a later tensor of the
            same size, so buffers stay held across layers). bench/onnx_memory.py (bench/plan_accuracy.py's
            float32 S / M, a 4,064-token prompt and 32 tokens, two runs each), peak anonymous memory:
            the shared arena 272 / 501 MiB (the same each run), prefill 2.8-3.1 / 15.4-17.6 s; malloc
            267-284 / 529-565 MiB, 2.8-3.0 / 16.9-18.1 s; malloc with buffer reuse (this class before)
            308-321 / 719-751 MiB, 3.4-3.5 / 16.9-17.0 s. At 512 tokens the arena took 87 / 157 MiB
            against 155-165 / 338-415 before. With malloc glibc's heap holds 1.3-2.4x the live tensors
            and varies run to run; the arena's size is what ``footprint(..., engine="onnxruntime")``
            predicts (regions doubling from 1 MiB).
        buffer_reuse: ONNX Runtime's buffer reuse (its default; off here, see above).
        prefill_chunk: tokens per prefill chunk (see above); None: the whole prompt in one chunk.
    """

    name = "onnx"

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None, share_weights: bool = True,
                 memory_arena: bool = True, prefill_chunk: int | None = PREFILL_CHUNK, buffer_reuse: bool = False):
        require("onnxruntime")
        import onnxruntime as ort

        self.dir = Path(export_dir)
        if not is_export_dir(self.dir):
            raise ElasticError(f"not an ONNX export: {PREFILL} and {DECODE} are expected here "
                               "(write them with `elastic export MODEL_DIR --out DIR`)", path=str(self.dir))
        graphs = (PREFILL, DECODE, EXTEND) if (self.dir / EXTEND).is_file() else (PREFILL, DECODE)
        self.weights = mapped_weights(self.dir, graphs) if share_weights else {}
        shared = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in self.weights.items()}
        arena = memory_arena and shared_arena(ort)

        def options(graph: str):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.enable_cpu_mem_arena = arena
            opts.enable_mem_reuse = buffer_reuse  # see memory_arena above
            if arena:
                opts.add_session_config_entry("session.use_env_allocators", "1")
            # ONNX Runtime's default order runs the nodes that only feed a graph output (each Mamba
            # layer's conv-state Slice, its final-state einsum) after everything the logits need, so each
            # layer's padded conv input and scan output stay alive to the end of the graph; by priority
            # they run where they stand. A 4,064-token prompt and 8 tokens on bench/plan_accuracy.py's
            # float32 S / M, two runs each: max RSS 554-573 / 1,462-1,474 MB by priority, 582-601 /
            # 1,501-1,531 MB in the default order, in the same time on S and up to 6% more on M
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            if threads:
                opts.intra_op_num_threads = threads
            if shared:
                opts.add_session_config_entry("session.disable_prepacking", "1")
                for name in external_initializers(self.dir / graph):
                    opts.add_initializer(name, shared[name])
            for key, value in (session_config or {}).items():
                opts.add_session_config_entry(key, value)
            return opts

        self._shared = shared  # ONNX Runtime reads these buffers for as long as the sessions live
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.prefill_session = ort.InferenceSession(str(self.dir / PREFILL), options(PREFILL), providers=providers)
            self.decode_session = ort.InferenceSession(str(self.dir / DECODE), options(DECODE), providers=providers)
            self.extend_session = (ort.InferenceSession(str(self.dir / EXTEND), options(EXTEND), providers=providers)
                                   if EXTEND in graphs else None)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ElasticError(f"ONNX Runtime cannot load the graphs ({type(e).__name__}: {e})",
                               path=str(self.dir)) from None
        self.prefill_outputs = [o.name for o in self.prefill_session.get_outputs()]
        self.decode_outputs = [o.name for o in self.decode_session.get_outputs()]
        self.extend_outputs = [o.name for o in self.extend_session.get_outputs()] if self.extend_session else []
        self.state_names = [i.name.removeprefix(PAST) for i in self.decode_session.get_inputs() if i.name != "input_ids"]
        self.vocab_size = int(self.prefill_session.get_outputs()[0].shape[-1])
        if prefill_chunk is not None and prefill_chunk < 2:
            raise ElasticError(f"prefill_chunk must be at least 2 tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk if self.extend_session is not None else None

    def _state(self, names: list[str], outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {n.removeprefix(PRESENT): v for n, v in zip(names[1:], outs[1:])}

    def prefill(self, input_ids: np.ndarray, chunk: int | None = None,
                all_logits: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits float32, state) for prompt ids (b, l): the last position's logits (b, 1, vocab)
        after a prefill in chunks of ``chunk`` tokens (default ``prefill_chunk``); with
        ``all_logits``, a one-token prompt, or no ``extend.onnx``: every position's (b, l, vocab)
        from ``prefill.onnx`` over the whole prompt."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if all_logits or self.extend_session is None or ids.shape[1] < 2:
            outs = self.prefill_session.run(None, {"input_ids": ids})
            return outs[0], self._state(self.prefill_outputs, outs)
        chunk = chunk or self.prefill_chunk or ids.shape[1]
        if chunk < 2:
            raise ElasticError(f"a prefill chunk must be at least 2 tokens, got {chunk}")
        logits, state = None, self.empty_state(ids.shape[0])
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            if piece.shape[1] == 1:  # extend takes two tokens or more (the trace specialises one)
                logits, state = self.step(piece, state)
                continue
            feed = {"input_ids": piece, **{PAST + n: state[n] for n in self.state_names}}
            outs = self.extend_session.run(None, feed)
            logits, state = outs[0], self._state(self.extend_outputs, outs)
        return logits, state

    def empty_state(self, batch: int) -> dict[str, np.ndarray]:
        """The state before any token: zeros, keys and values of no position (extend.onnx's input for
        a prompt's first chunk; it computes what prefill.onnx does)."""
        out = {}
        for i in self.extend_session.get_inputs()[1:]:
            dims = [batch if d == "batch" else 0 if isinstance(d, str) or d is None else d for d in i.shape]
            out[i.name.removeprefix(PAST)] = np.zeros(dims, dtype=np.float16 if "float16" in i.type else np.float32)
        return out

    def step(self, next_ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits (b, 1, vocab), new state) for one token per sequence, ids (b,) or (b, 1)."""
        feed = {"input_ids": np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)}
        feed.update({PAST + n: state[n] for n in self.state_names})
        outs = self.decode_session.run(None, feed)
        return outs[0], self._state(self.decode_outputs, outs)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Same contract as ``elastic.slicer.nn.model.generate``: (b, prompt + generated) ids, greedy, stops
        early once every row has produced ``eos_token_id`` (``elastic.slicer.nn.generate.greedy`` over this)."""
        from elastic.slicer.nn.generate import greedy

        input_ids = np.asarray(input_ids, dtype=np.int64)
        out = greedy(self, input_ids, max_new_tokens, eos_token_id)
        new = np.array(out.tokens, dtype=np.int64).reshape(input_ids.shape[0], -1)  # (b, n), n >= 0
        return np.concatenate([input_ids, new], axis=1)


def max_context(export_dir: str | Path) -> int | None:
    """The longest sequence (prompt + output) the export was built for, as ``elastic export --context``
    recorded it for the TensorRT engines (``export_manifest.json``, else ``engine_meta.json``); None
    when nothing is recorded (an ONNX-only export: the graphs themselves take any length)."""
    for name, keys in ((MANIFEST, ("tensorrt", "settings", "max_context")), (ENGINE_META, ("settings", "max_context"))):
        try:
            value: Any = json.loads((Path(export_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def generate_text(path: str | Path, prompt: str, *, backend: str | None = None, max_new_tokens: int = 32,
                  threads: int | None = None, on_text: Callable[[str], None] | None = None,
                  budget: str | None = None, think_budget: str | None = None, answer_budget: str | None = None,
                  max_think_tokens: int | None = None, allow_off_curve: bool = False) -> dict[str, Any]:
    """Greedy generation from a model directory (PyTorch), an export directory (ONNX Runtime) or a
    GGUF (llama.cpp), timed.

    Args:
        path: a model directory (config.json + safetensors) for ``torch``, an export directory for
            ``onnx``, a ``.gguf`` file or a directory holding one for ``llama.cpp``.
        backend: "torch", "onnx" or "llama.cpp"; None picks "onnx" for an export directory,
            "llama.cpp" for a GGUF, else "torch".
        max_new_tokens: tokens to generate; stops early at the config's ``eos_token_id``.
        on_text: called with each new piece of text as it is decoded (for streaming).
        budget: run this budget of an elastic checkpoint on views of the parent's tensors, without
            slicing (``elastic.slicer.nn.budget.generate_budget``; torch only).
        think_budget, answer_budget: budget control (both together, instead of ``budget``): think
            with one budget until ``</think>`` or ``max_think_tokens``, then answer with the other
            (``elastic.slicer.nn.budget.ResidentParent.generate_split``; torch only).
        allow_off_curve: run a budget size the checkpoint's size curve measured outside its trained
            neighbours (refused otherwise, as ``elastic slice`` refuses it).

    Returns:
        ``backend``, ``prompt_tokens``, ``tokens`` (generated ids), ``text`` (None when the ids
        cannot be decoded), ``new_tokens``, ``prefill_s``, ``decode_s``, ``tokens_per_s`` (decode);
        with ``budget`` also ``budget``, ``spec_source`` and ``storage`` (view and copied bytes).

    Raises:
        ElasticError: not a model/export directory, or prompt + ``max_new_tokens`` is longer than the
            export's recorded maximum context.
    """
    from elastic.slicer.formats.tokenizer import load_tokenizer
    from elastic.slicer.nn.generate import config_eos_token_id, generate_text as run
    from elastic.slicer.nn.smoke import smoke_test

    from .llama_runtime import find_gguf, generate_gguf

    path = Path(path)
    backend = backend or ("onnx" if is_export_dir(path) else "llama.cpp" if find_gguf(path) else "torch")
    if backend not in BACKENDS:
        raise ElasticError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if think_budget is not None or answer_budget is not None or max_think_tokens is not None:
        if budget is not None or think_budget is None or answer_budget is None:
            raise ElasticError("budget control needs both --think-budget and --answer-budget (--max-think-tokens "
                               "goes with them) and no --budget, since the answer budget is the model that answers; "
                               "give --think-budget B1 --answer-budget B2, or --budget B alone", path=str(path))
        budget = answer_budget
    if budget is not None:
        if backend != "torch":
            raise ElasticError(f"a budget runs on the PyTorch reference model (backend torch), not {backend}: a "
                               "budget of an elastic checkpoint is computed from the parent's tensors; to run it "
                               f"on {backend}, slice the budget and export that", path=str(path))
        from elastic.slicer.nn.budget import generate_budget

        if threads:
            import torch

            torch.set_num_threads(threads)
        return generate_budget(path, budget, prompt, max_new_tokens, on_text=on_text, think_budget=think_budget,
                               max_think_tokens=max_think_tokens, allow_off_curve=allow_off_curve)
    if backend == "llama.cpp":
        return generate_gguf(path, prompt, max_new_tokens=max_new_tokens, threads=threads, on_text=on_text)
    if backend == "torch":
        if threads:
            import torch

            torch.set_num_threads(threads)
        return smoke_test(path, prompt, max_new_tokens, on_text=on_text)  # eos: config.json's
    gen = OnnxGenerator(path, threads=threads)
    return run(gen, load_tokenizer(path), prompt, max_new_tokens, eos_token_id=config_eos_token_id(path),
               max_context=max_context(path), on_text=on_text, path=str(path))
