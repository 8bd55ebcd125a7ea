"""Check: every slice kind x GGUF precision, run by llama.cpp itself.

    python bench/gguf_matrix.py [--dir /tmp/elastic-gguf-matrix] [--windows 16] [--tokens 16]

Slices (``elastic slice``'s library call, from the bundled demos): the demo's 100%, 75% and 50%
budgets, a per-layer-FFN spec that keeps the attention layer (NVIDIA's Puzzle form), the demo's
100% cast to bf16, an int8 (SmoothQuant) Model Optimizer slice of the 100% budget (when
nvidia-modelopt is installed), and every budget of the MoE demo. Each is exported with
``elastic export --format gguf`` (``export_gguf``) at f32, q8_0 and q4_k_m, and for each row:
- converts: the GGUF was written (else the refusal, which comes before writing);
- loads: llama.cpp loads it (``llama_cpp.Llama``);
- prompt ids: llama.cpp's tokenization of a prompt equals transformers' ``AutoTokenizer``'s;
- greedy: llama.cpp's 16 greedy ids equal ``elastic generate``'s (PyTorch reference) — for f32,
  where they must; for the quantized ones the count of equal leading ids is shown;
- perplexity on the held-out text (``elastic eval``'s windows): the reference's, and llama.cpp's
  for each GGUF.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "slicer" / "demo_checkpoint"
MOE = ROOT / "slicer" / "moe_demo_checkpoint"
PROMPT = "def main(args):\n    return"
FFN_SPEC = {"hidden_size": 64, "layers": [{"index": 1, "intermediate_size": 192},
                                          {"index": 4, "intermediate_size": 128},
                                          {"index": 6, "intermediate_size": 64}]}


def slices(work: Path) -> dict[str, Path | str]:
    """Every slice kind: its directory, or why it could not be made."""
    from importlib.util import find_spec

    from elastic.slicer.errors import ElasticError
    from elastic.slicer.slice import slice_checkpoint

    spec = work / "ffn.json"
    spec.write_text(json.dumps(FFN_SPEC))
    kinds = {"demo 100%": (DEMO, {"budget": "100%"}), "demo 75%": (DEMO, {"budget": "75%"}),
             "demo 50%": (DEMO, {"budget": "50%"}), "per-layer FFN": (DEMO, {"spec": spec}),
             "demo 100% bf16": (DEMO, {"budget": "100%", "dtype": "bfloat16"})}
    for b in ("100%", "75%", "50%"):
        kinds[f"MoE {b}"] = (MOE, {"budget": b})
    out: dict[str, Path | str] = {}
    for key, (src, kw) in kinds.items():
        dest = work / "slices" / key.replace(" ", "_").replace("%", "")
        try:
            out[key] = dest if (dest / "config.json").is_file() else slice_checkpoint(src, dest, force=True, **kw).out
        except ElasticError as e:
            out[key] = e.message
    if find_spec("modelopt") is not None:
        from elastic.slicer.quantize.workflow import slice_and_quantize
        from elastic.slicer.storage.reader import Checkpoint

        dest = work / "slices" / "int8"
        if not (dest / "config.json").is_file():
            slice_and_quantize(Checkpoint.open(DEMO, require_weights=True), dest, "int8", budget="100%", force=True)
        out["int8 (Model Optimizer) 100%"] = dest
    return out


def row(key: str, model: Path, precision: str, work: Path, windows: int, tokens: int, ref: dict) -> dict:
    from transformers import AutoTokenizer

    from elastic.export.gguf import export_gguf
    from elastic.export.llama_runtime import LlamaCppModel, perplexity_gguf
    from elastic.export.runtime import generate_text
    from elastic.slicer.errors import ElasticError

    out = work / "gguf" / f"{model.name}-{precision}"
    try:
        g = export_gguf(model, out, precision=precision, force=True)
    except ElasticError as e:
        return {"slice": key, "precision": precision, "converts": False, "why": e.render().replace("\n", " ")}
    r = {"slice": key, "precision": precision, "converts": True, "bytes": g.bytes, "fallbacks": len(g.fallbacks)}
    try:
        llm = LlamaCppModel(g.file)
    except ElasticError as e:
        return r | {"loads": False, "why": e.message}
    r["loads"] = True
    hf = AutoTokenizer.from_pretrained(model)
    r["prompt_ids_equal"] = llm.tokenizer().encode(PROMPT, add_special_tokens=True) == hf(PROMPT)["input_ids"]
    theirs = generate_text(g.file, PROMPT, backend="llama.cpp", max_new_tokens=tokens)["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(theirs, ref["tokens"])) if a != b), min(len(theirs), len(ref["tokens"])))
    r["greedy_equal"] = theirs == ref["tokens"]
    r["greedy_leading_equal"] = same
    r["perplexity"] = round(perplexity_gguf(g.file, max_windows=windows).perplexity, 4)
    r["reference_perplexity"] = ref["perplexity"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/elastic-gguf-matrix"))
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens for perplexity")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens compared")
    ap.add_argument("--precisions", default="f32,q8_0,q4_k_m")
    ap.add_argument("--clean", action="store_true")
    args = ap.parse_args()

    from elastic.export.runtime import generate_text
    from elastic.slicer.quantize.evaluate import perplexity

    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for key, model in slices(args.dir).items():
        if isinstance(model, str):
            rows.append({"slice": key, "converts": False, "why": f"not sliced: {model}"})
            continue
        ref = {"tokens": generate_text(model, PROMPT, backend="torch", max_new_tokens=args.tokens)["tokens"],
               "perplexity": round(perplexity(model, max_windows=args.windows).perplexity, 4)}
        for p in args.precisions.split(","):
            rows.append(row(key, model, p, args.dir, args.windows, args.tokens, ref))
    print(f"{'slice':<28}{'gguf':<8}{'converts':<9}{'loads':<6}{'prompt ids':<11}{'greedy (16)':<13}"
          f"{'ppl llama.cpp':>14}{'ppl ref':>9}  fallbacks / why")
    for r in rows:
        if not r.get("converts") or not r.get("loads"):
            print(f"{r['slice']:<28}{r.get('precision', '-'):<8}{'yes' if r.get('converts') else 'no':<9}"
                  f"{'no' if r.get('converts') else '-':<6}{'':<11}{'':<13}{'':>14}{'':>9}  {r['why'][:110]}")
            continue
        greedy = "equal" if r["greedy_equal"] else f"{r['greedy_leading_equal']}/{args.tokens} lead"
        print(f"{r['slice']:<28}{r['precision']:<8}{'yes':<9}{'yes':<6}{'equal' if r['prompt_ids_equal'] else 'DIFFER':<11}"
              f"{greedy:<13}{r['perplexity']:>14.4f}{r['reference_perplexity']:>9.4f}  {r['fallbacks']}")
    f32 = [r for r in rows if r.get("precision") == "f32" and r.get("loads")]
    summary = {"rows": rows, "f32_greedy_all_equal": all(r["greedy_equal"] for r in f32),
               "prompt_ids_all_equal": all(r["prompt_ids_equal"] for r in rows if r.get("loads")),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
