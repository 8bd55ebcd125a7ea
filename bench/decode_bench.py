"""Benchmark: decode speed on CPU of a ~80M-parameter Nemotron-H, full and sliced to ~50%.

    python bench/decode_bench.py [--dir /tmp/elastic-decode-bench] [--tokens 64] [--repeat 5] [--threads 1]

Builds a random parent (Mamba, attention and MLP layers; weights from ``elastic.slicer.nn.model.init_weights``),
slices it with a ~50% spec (hidden, Mamba heads, attention heads, FFN: see ``HALF``), exports both with
``elastic export``'s library call, then measures in one run, greedy, batch 1, a 32-token prompt, the
median of ``--repeat`` rounds that take every measurement once, in turn (a shared machine's load then
falls on all of them alike):
- ONNX Runtime decode tokens/s (``OnnxGenerator.step``), full and half: ``half_over_full``;
- our PyTorch reference's decode tokens/s (the same loop over ``NemotronH`` with its cache):
  ``ort_over_torch`` (full model);
- ours against transformers' ``NemotronHForCausalLM`` on the same checkpoint, both through their
  greedy ``generate`` (transformers: ``use_cache=True``), decode rate = (N - 1) / (t(N) - t(1)) so
  the prefill cancels: ``ours_over_transformers``;
- llama.cpp itself (llama-cpp-python) on GGUFs of the full model written by ``elastic export --format
  gguf``: f32 and q8_0 (llama.cpp's quantizer), the same decode loop: ``llama_f32_over_ort``,
  ``llama_q8_0_over_ort`` (skipped, and said, when llama-cpp-python is not installed).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARENT = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "vocab_size": 16000,
    "hidden_size": 768,
    "hybrid_override_pattern": "M-M*-M-M-M*-M-",
    "intermediate_size": 3072,
    "mamba_num_heads": 24,
    "mamba_head_dim": 64,
    "n_groups": 4,
    "ssm_state_size": 64,
    "conv_kernel": 4,
    "chunk_size": 64,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "layer_norm_epsilon": 1e-5,
    "time_step_limit": [0.0, float("inf")],
}
# the 50% slice (51% of the parameters): Mamba heads and FFN halved, attention heads 12 -> 8 (a multiple of
# the 4 KV heads), hidden 768 -> 576; B, C, groups, state size and KV heads are never elastic
HALF = {"mamba_num_heads": 12, "num_attention_heads": 8, "intermediate_size": 1536}
HALF_HIDDEN = 576


def build(root: Path) -> tuple[Path, Path, dict]:
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.nn.model import build_model, save_model
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.formats.spec import SPEC_FIELDS

    arch = Arch.from_config(PARENT)
    full, half = root / "full", root / "half"
    if not (full / "config.json").is_file():
        save_model(build_model(arch, seed=0), full, force=True)
    spec = {"hidden_size": HALF_HIDDEN, "layers": [
        {"index": i, **{f: HALF[f] for f in SPEC_FIELDS[layer.kind] if f in HALF}} for i, layer in enumerate(arch.layers)]}
    (root / "half_spec.json").write_text(json.dumps(spec))
    if not (half / "config.json").is_file():
        slice_checkpoint(full, half, spec=root / "half_spec.json", force=True)
    return full, half, spec


def add_tokenizer(model_dir: Path) -> None:
    """A small byte-level BPE tokenizer.json (GPT-2's pre-tokenizer) for the random model: a GGUF carries
    its tokenizer. The prompt is random ids; the tokenizer only has to exist."""
    if (model_dir / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    tok.save(str(model_dir / "tokenizer.json"))


def gguf_export(model_dir: Path, out: Path, precision: str) -> Path | None:
    """The model as a GGUF at ``precision`` (None when llama-cpp-python is missing)."""
    from importlib.util import find_spec

    if find_spec("llama_cpp") is None or find_spec("gguf") is None:
        return None
    from elastic.export.gguf import export_gguf

    add_tokenizer(model_dir)
    file = out / f"model-{precision}.gguf"
    if not file.is_file():
        export_gguf(model_dir, out, precision=precision, force=True)
    return file


def llama_decode(gguf: Path, prompt, tokens: int, threads: int):
    """A function timing llama.cpp's decode loop (same loop as ``ort_decode``); returns tokens/s."""
    from elastic.export.llama_runtime import LlamaCppModel

    model = LlamaCppModel(gguf, n_ctx=256, threads=threads)

    def run() -> float:
        logits, state = model.prefill(prompt.tolist())
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits, state = model.step(logits[:, -1].argmax(-1), state)
        return tokens / (time.perf_counter() - t0)

    return run


def export(model_dir: Path, out: Path) -> None:
    from elastic.export.pipeline import export_model

    if not (out / "decode.onnx").is_file():
        export_model(model_dir, out, force=True)


def ort_decode(export_dir: Path, prompt, tokens: int, threads: int):
    """A function timing ONNX Runtime's decode loop; returns tokens/s. Pool threads do not spin after a
    run: spinning threads would steal the cores from the measurement that runs next."""
    from elastic.export.runtime import OnnxGenerator

    gen = OnnxGenerator(export_dir, threads=threads, session_config={"session.intra_op.allow_spinning": "0"})

    def run() -> float:
        logits, state = gen.prefill(prompt.numpy())
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits, state = gen.step(logits[:, -1].argmax(-1), state)
        return tokens / (time.perf_counter() - t0)

    return run


def torch_decode(model, prompt, tokens: int):
    """A function timing the reference model's decode loop (same loop as ``ort_decode``); returns tokens/s."""
    import torch

    def run() -> float:
        with torch.no_grad():
            cache = model.new_cache()
            logits = model(prompt, cache=cache, last_only=True)
            t0 = time.perf_counter()
            for _ in range(tokens):
                logits = model(logits[:, -1].argmax(-1)[:, None], cache=cache)
            return tokens / (time.perf_counter() - t0)

    return run


def generate_decode(gen_fn, tokens: int):
    """A function timing a greedy ``generate(n)`` call at n = 1 and n = tokens; returns (tokens/s, ids):
    (tokens - 1) / (t(tokens) - t(1)), so the prefill cancels."""

    def run():
        t0 = time.perf_counter()
        gen_fn(1)
        t1 = time.perf_counter()
        out = gen_fn(tokens)
        t2 = time.perf_counter()
        return (tokens - 1) / ((t2 - t1) - (t1 - t0)), out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/elastic-decode-bench"))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads of every runtime (1: steadier on a shared machine)")
    ap.add_argument("--clean", action="store_true", help="rebuild the checkpoints and exports")
    args = ap.parse_args()

    import os

    os.environ.setdefault("ELASTIC_KERNELS", "0")
    import torch

    from elastic.slicer.nn.model import generate, load_model

    torch.set_num_threads(args.threads)
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    full_dir, half_dir, _ = build(args.dir)
    export(full_dir, args.dir / "full-onnx")
    export(half_dir, args.dir / "half-onnx")
    ggufs = {p: gguf_export(full_dir, args.dir / f"full-gguf-{p}", p) for p in ("f32", "q8_0")}
    print(f"built and exported in {time.perf_counter() - t0:.1f} s ({args.dir})")

    full, half = load_model(full_dir), load_model(half_dir)
    p_full = sum(p.numel() for p in full.parameters())
    p_half = sum(p.numel() for p in half.parameters())
    prompt = torch.randint(0, PARENT["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))

    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(full_dir, dtype=torch.float32).eval()

    def hf_gen(n):
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0)

    runs = {
        "ort_full": ort_decode(args.dir / "full-onnx", prompt, args.tokens, args.threads),
        "ort_half": ort_decode(args.dir / "half-onnx", prompt, args.tokens, args.threads),
        "torch_full": torch_decode(full, prompt, args.tokens),
        "torch_half": torch_decode(half, prompt, args.tokens),
        "ours_generate_full": generate_decode(lambda n: generate(full, prompt, n), args.tokens),
        "transformers_generate_full": generate_decode(hf_gen, args.tokens),
    }
    for p, file in ggufs.items():
        if file is not None:
            runs[f"llama_{p}_full"] = llama_decode(file, prompt, args.tokens, args.threads)
        else:
            print(f"llama.cpp {p}: skipped (pip install -e '.[gguf]' for llama-cpp-python)")
    samples: dict[str, list] = {k: [] for k in runs}
    outs = {}
    for r in range(args.repeat + 1):  # round 0 warms up; then every measurement once per round, in turn,
        for name, run in runs.items():  # so all of them see the same load of a shared machine
            got = run()
            if isinstance(got, tuple):
                got, outs[name] = got
            if r:
                samples[name].append(got)
    rate = {k: statistics.median(v) for k, v in samples.items()}
    for name, n_params in (("full", p_full), ("half", p_half)):
        print(f"{name:5} {n_params:>11,} params  decode loop: onnxruntime {rate['ort_' + name]:7.1f} tok/s   "
              f"pytorch (ours) {rate['torch_' + name]:7.1f} tok/s")
    same = outs["ours_generate_full"][0, 32:].tolist() == outs["transformers_generate_full"][0, 32:].tolist()
    print(f"full  generate(): ours {rate['ours_generate_full']:7.1f} tok/s   transformers NemotronHForCausalLM "
          f"{rate['transformers_generate_full']:7.1f} tok/s   same greedy tokens: {same}")

    for p in ggufs:
        if f"llama_{p}_full" in rate:
            print(f"full  llama.cpp {p:5} GGUF decode loop {rate[f'llama_{p}_full']:7.1f} tok/s")
    result = {
        **{f"llama_{p}_over_ort": round(rate[f"llama_{p}_full"] / rate["ort_full"], 3)
           for p in ggufs if f"llama_{p}_full" in rate},
        "ort_over_torch": round(rate["ort_full"] / rate["torch_full"], 3),
        "ort_over_torch_half": round(rate["ort_half"] / rate["torch_half"], 3),
        "half_over_full": round(rate["ort_half"] / rate["ort_full"], 3),
        "half_over_full_torch": round(rate["torch_half"] / rate["torch_full"], 3),
        "ours_over_transformers": round(rate["ours_generate_full"] / rate["transformers_generate_full"], 3),
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "parameters": {"full": p_full, "half": p_half, "ratio": round(p_half / p_full, 3)},
        "greedy_tokens_equal_transformers": same,
        "decode_tokens": args.tokens,
        "repeat": args.repeat,
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
