"""Rebuild the bundled demo checkpoint (slicer/demo_checkpoint): a tiny elastic Nemotron-H trained on
real text, with budgets 100%, 75% and 50% of its parameters.

    python examples/make_demo_checkpoint.py [--out slicer/demo_checkpoint] [--work /tmp/elastic-demo]

Steps (all local, no download): a byte-level BPE tokenizer trained on the Python standard
library's source files; those files tokenized into shards (5% of the documents held out); a dense
parent with the shape below pretrained from scratch; then the elastic checkpoint made by

    elastic train --parent WORK/parent --data WORK/tokens --out WORK/elastic --budgets 100%=1.0,75%=0.75,50%=0.5 \\
        --stage1-steps 300 --stage1-context 128 --stage2-steps 100 --stage2-context 256 --batch-size 16 --force

which this script runs (and prints), then copies WORK/elastic's files over OUT. Its size curve
(OUT/size_curve.json, which a rebuilt checkpoint no longer matches) is measured after:
`elastic eval -c OUT --curve --out OUT --force`.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import build_model, write_model
from elastic.slicer.storage.writer import ShardedWriter
from elastic.trainer.data import TokenDataset, build_token_shards, stdlib_corpus
from elastic.trainer.pretrain import fit
from elastic.trainer.tokenizer import load_tokenizer, train_tokenizer

PARENT = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "hidden_size": 64,
    "hybrid_override_pattern": "M-M*-M-",
    "num_hidden_layers": 7,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 256,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "time_step_limit": [0.0, float("inf")],
    "tie_word_embeddings": False,
}
VOCAB = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_command(work: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "elastic.cli.main", "train", "--parent", str(work / "parent"),
            "--data", str(work / "tokens"), "--out", str(out), "--budgets", "100%=1.0,75%=0.75,50%=0.5",
            "--stage1-steps", "300", "--stage1-context", "128", "--stage2-steps", "100", "--stage2-context", "256",
            "--batch-size", "16", "--force"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("slicer/demo_checkpoint"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/elastic-demo"))
    ap.add_argument("--pretrain-steps", type=int, default=600)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    files = stdlib_corpus(max_bytes=1_500_000)
    tok = train_tokenizer(files, VOCAB, work / "tokenizer")
    build_token_shards(files, load_tokenizer(work / "tokenizer"), work / "tokens", overwrite=True)
    config = PARENT | {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                       "pad_token_id": tok.pad_id}
    pretrain_parent(config, work, args.pretrain_steps)
    # trained into the work directory, then copied over the demo: the bundled copy is a source file of
    # the repository (no output marker), which `elastic train --force` rightly refuses to replace
    train_and_copy(train_command(work, work / "elastic"), work / "elastic", args.out)


def pretrain_parent(config: dict, work: Path, steps: int) -> None:
    """WORK/parent: ``config`` built (seed 0), pretrained on WORK/tokens, written with WORK/tokenizer's files."""
    parent = build_model(Arch.from_config(config), seed=0)
    ds = TokenDataset(work / "tokens", "train")
    r = fit(parent, ds, steps, batch_size=16, context=128, lr=3e-3, warmup=50, seed=1)
    print(f"parent: {sum(p.numel() for p in parent.parameters()):,} parameters, "
          f"train loss {r['losses'][0]:.3f} -> {sum(r['losses'][-20:]) / 20:.3f} over {r['tokens']:,} tokens",
          flush=True)
    with ShardedWriter(work / "parent", force=True) as w:  # the parent with its tokenizer, one elastic output
        write_model(w, parent, extra_config={k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        for name in TOKENIZER_FILES:
            w.add_file(work / "tokenizer" / name)


def train_and_copy(cmd: list[str], trained: Path, out: Path) -> None:
    """Run (and print) the `elastic train` command ``cmd`` writing ``trained``, then copy its files over ``out``."""
    print("$ " + shlex.join(["elastic", *cmd[3:]]), flush=True)
    subprocess.run(cmd, check=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(trained.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
    print(f"copied {trained} to {out}")

if __name__ == "__main__":
    main()
