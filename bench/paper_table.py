"""The Nemotron Elastic paper's comparison, in miniature, on a real corpus with no download.

    python bench/paper_table.py [--scale small|medium] [--dir /tmp/elastic-paper]

Corpus: the Python standard library's own source files (a few MB; 5% of the documents held out
for validation). Tokenizer: byte-level BPE trained on it. Rows (validation loss, tokens used):
  (a) the dense parent, trained from scratch;
  (b) every budget after one elastic run (importance, permutation, router, two-stage distillation);
  (c) every smaller budget pruned by importance, no training;
  (d) every smaller budget pruned, then distilled on its own with as many tokens as the elastic run
      spent on that budget (token-fair: the same training that budget got inside the elastic run);
  (d_all) the same with as many tokens as the whole elastic run (so separate compression of every
      budget costs that many tokens per budget);
  (e) the smallest budget's architecture trained from scratch with those tokens.
Expected (the paper's claim): (b) far better than (c), within a few percent of the token-fair (d),
and the full budget within a few percent of the parent; (d_all) shows what the elastic run's
sharing costs against separate compression at many times the tokens. The last line is one JSON
object (with ``checks``: each claim above, measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALES = {
    # parent size, steps: (a) pretraining, (b) elastic stage 1 / stage 2
    "tiny": dict(hidden=64, mamba_heads=4, head_dim=16, ffn=192, attn_heads=4, vocab=512, corpus=300_000,
                 pretrain=40, stage1=20, stage2=6, batch=8, ctx1=64, ctx2=64),  # a smoke run of the script
    "small": dict(hidden=128, mamba_heads=8, head_dim=16, ffn=384, attn_heads=4, vocab=1024, corpus=2_000_000,
                  pretrain=600, stage1=240, stage2=80, batch=16, ctx1=128, ctx2=256),
    # sized to finish in about an hour on a 2-core CPU: the first medium (hidden 256, vocab 4096, 1500
    # pretraining steps at context 256; about 1.5e11 FLOPs a step) was still pretraining after 32 minutes
    "medium": dict(hidden=192, mamba_heads=12, head_dim=32, ffn=768, attn_heads=6, vocab=2048, corpus=4_000_000,
                   pretrain=600, stage1=240, stage2=80, batch=16, ctx1=128, ctx2=256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=SCALES, default="small")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/elastic-paper"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    s = SCALES[args.scale]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.nn.model import build_model, load_model, save_model
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.trainer.data import TokenDataset, build_token_shards, stdlib_corpus
    from elastic.trainer.importance import width_importance
    from elastic.trainer.permute import orders, permute_
    from elastic.trainer.pretrain import fit
    from elastic.trainer.tokenizer import load_tokenizer, train_tokenizer
    from elastic.trainer.train import BudgetMissError, Stage, TrainConfig, eval_loss, train

    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    files = stdlib_corpus(max_bytes=s["corpus"])
    tok = train_tokenizer(files, s["vocab"], d / "tokenizer")
    build_token_shards(files, load_tokenizer(d / "tokenizer"), d / "tokens", overwrite=True)
    train_ds, val_ds = TokenDataset(d / "tokens", "train"), TokenDataset(d / "tokens", "val")
    print(f"corpus: {len(files)} files, {len(train_ds):,} train / {len(val_ds):,} val tokens, vocab {tok.vocab_size}",
          flush=True)

    config = {
        "model_type": "nemotron_h", "vocab_size": tok.vocab_size, "hidden_size": s["hidden"],
        "hybrid_override_pattern": "M-M*-M-M-", "mamba_num_heads": s["mamba_heads"], "mamba_head_dim": s["head_dim"],
        "n_groups": 2, "ssm_state_size": 16, "chunk_size": 64, "num_attention_heads": s["attn_heads"],
        "num_key_value_heads": 2, "head_dim": s["hidden"] // s["attn_heads"], "intermediate_size": s["ffn"],
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
    }
    arch = Arch.from_config(config)
    ctx_eval, eval_batches = s["ctx2"], 16
    rows: list[dict] = []

    def row(name: str, budget: str, params: int, loss: float, tokens: int) -> None:
        rows.append({"row": name, "budget": budget, "parameters": params, "val_loss": round(loss, 4), "tokens": tokens})
        print(f"  ({name}) {budget:<6} {params:>10,} params  val loss {loss:.4f}  tokens {tokens:,}", flush=True)

    # (a) the dense parent from scratch
    parent = build_model(arch, seed=0)
    a = fit(parent, train_ds, s["pretrain"], batch_size=s["batch"], context=s["ctx1"], lr=3e-3, warmup=50, seed=1)
    save_model(parent, d / "parent", force=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / "parent" / f).write_bytes((d / "tokenizer" / f).read_bytes())
    parent = load_model(d / "parent")
    parent_loss = eval_loss(parent, val_ds, ctx_eval, eval_batches)
    row("a", "parent", arch.param_counts()["total"], parent_loss, a["tokens"])

    # (b) one elastic run for all budgets
    cfg = TrainConfig(stage1=Stage(s["stage1"], s["ctx1"]), stage2=Stage(s["stage2"], s["ctx2"], (0.5, 0.3, 0.2)),
                      batch_size=s["batch"], lr=1e-3, warmup=20, drop_layers=2, save_every=10**9, eval_batches=eval_batches)
    try:
        summary = train(d / "parent", d / "tokens", d / "elastic", cfg, work_dir=d / "elastic.work", force=True)
    except BudgetMissError as e:  # the checkpoint is written; the table reports the sizes it reached
        print(f"note: {e}", flush=True)
        summary = e.summary
    elastic_tokens = summary["tokens"]
    ec = json.loads((d / "elastic" / "elastic_config.json").read_text())
    specs = {name: SliceSpec.from_json(spec, arch) for name, spec in ec["resolved"].items()}
    for name, r in summary["budgets"].items():
        row("b", name, r["parameters"], r["val_loss"], elastic_tokens)

    # (c) pruned by importance, no training: the permuted parent cut to (b)'s sizes
    g = torch.Generator().manual_seed(cfg.seed + 7)
    calib = [train_ds.batch(g, cfg.batch_size, cfg.stage1.context)[0] for _ in range(cfg.importance_batches)]
    pruned = load_model(d / "parent")
    permute_(pruned, orders(pruned, width_importance(pruned, calib)))
    smaller = [name for name in specs if not specs[name].is_full(arch)]
    for name in smaller:
        row("c", name, specs[name].parameters(arch), eval_loss(pruned, val_ds, ctx_eval, eval_batches, spec=specs[name]), 0)

    # (d) each smaller budget pruned, then distilled alone: with the tokens the elastic run spent on it
    # (token-fair) and with the whole run's tokens (d_all)
    def distill_alone(name: str, tokens: int) -> tuple[float, int]:
        steps = max(1, round(tokens / (s["batch"] * s["ctx1"])))
        m = load_model(d / "parent")
        permute_(m, orders(m, width_importance(m, calib)))
        fit(m, train_ds, steps, batch_size=s["batch"], context=s["ctx1"], lr=1e-3, warmup=20, seed=2,
            teacher=parent, spec=specs[name])
        return eval_loss(m, val_ds, ctx_eval, eval_batches, spec=specs[name]), steps * s["batch"] * s["ctx1"]

    for name in smaller:
        loss, used = distill_alone(name, summary["budgets"][name]["tokens"])
        row("d", name, specs[name].parameters(arch), loss, used)
    steps_d = elastic_tokens // (s["batch"] * s["ctx1"])
    for name in smaller:
        loss, used = distill_alone(name, elastic_tokens)
        row("d_all", name, specs[name].parameters(arch), loss, used)

    # (e) the smallest budget's architecture from scratch, same tokens
    smallest = min(smaller, key=lambda n: specs[n].parameters(arch)) if smaller else None
    if smallest:
        child = build_model(specs[smallest].child_arch(arch), seed=3)
        e = fit(child, train_ds, steps_d, batch_size=s["batch"], context=s["ctx1"], lr=3e-3, warmup=50, seed=4)
        row("e", smallest, specs[smallest].parameters(arch), eval_loss(child, val_ds, ctx_eval, eval_batches), e["tokens"])

    total_d = sum(r["tokens"] for r in rows if r["row"] == "d_all")
    loss = {(r["row"], r["budget"]): r["val_loss"] for r in rows}
    checks = {name: {
        "b_vs_c": round(loss["b", name] / loss["c", name] - 1, 4),  # negative: (b) better than pruning alone
        "b_vs_d": round(loss["b", name] / loss["d", name] - 1, 4),  # the token-fair comparison
        "b_vs_d_all": round(loss["b", name] / loss["d_all", name] - 1, 4),
    } for name in smaller}
    full = next((n for n in specs if specs[n].is_full(arch)), None)
    print(f"\nelastic run: {elastic_tokens:,} tokens for all {len(specs)} budgets; separate distillation (d_all): "
          f"{total_d:,} tokens for {len(smaller)} budgets ({total_d / max(1, elastic_tokens):.1f}x); "
          f"{time.perf_counter() - t_start:.0f}s in all")
    for name, c in checks.items():
        print(f"  {name}: (b) vs (c) {c['b_vs_c']:+.1%}, vs token-fair (d) {c['b_vs_d']:+.1%}, "
              f"vs (d_all) {c['b_vs_d_all']:+.1%}")
    print(json.dumps({"scale": args.scale, "parent_val_loss": round(parent_loss, 4), "elastic_tokens": elastic_tokens,
                      "separate_tokens_total": total_d, "budget_tokens": {n: r["tokens"] for n, r in summary["budgets"].items()},
                      "full_vs_parent": round(loss["b", full] / parent_loss - 1, 4) if full else None,
                      "checks": checks, "rows": rows}))

if __name__ == "__main__":
    main()
