"""Rebuild the bundled MoE demo checkpoint (slicer/moe_demo_checkpoint): a tiny elastic Mamba +
attention + MoE hybrid (the Star Elastic layout in miniature) trained on real text, with budgets
100%, 75% and 50% of its parameters.

    python examples/make_moe_demo_checkpoint.py [--out slicer/moe_demo_checkpoint] [--work /tmp/elastic-moe-demo]

Steps (all local, no download): the dense demo's byte-level BPE tokenizer (slicer/demo_checkpoint)
tokenizes the Python standard library's source files (5% of the documents held out); a MoE parent
with the shape below is pretrained from scratch; then

    elastic train --parent WORK/parent --data WORK/tokens --out WORK/elastic --budgets 100%=1.0,75%=0.75,50%=0.5 \\
        --stage1-steps 300 --stage1-context 128 --stage2-steps 60 --stage2-context 256 --batch-size 16 --force

makes it elastic (experts ranked by router-weighted activation and permuted inside their routing
groups; the router chooses the expert count, expert and shared-expert widths with the other
dimensions), and its files are copied over OUT. The router trains at the default learning rate:
the per-step cost pulls each budget's argmax toward its target (trainer.elastic.move_loss), and the
end of the run resolves the budgets by constrained choice. Its size curve (OUT/size_curve.json, which
a rebuilt checkpoint no longer matches) is measured after: `elastic eval -c OUT --curve --out OUT --force`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from elastic.trainer.data import build_token_shards, stdlib_corpus
from elastic.trainer.tokenizer import load_tokenizer
from make_demo_checkpoint import TOKENIZER_FILES, pretrain_parent, train_and_copy  # this folder, run as a script

ROOT = Path(__file__).resolve().parent.parent
PARENT = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "hidden_size": 64,
    "hybrid_override_pattern": "MEM*EME",
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
    # the Star Elastic router: sigmoid scores, routing groups, top-k, normalised and scaled weights
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "moe_intermediate_size": 48,
    "moe_shared_expert_intermediate_size": 96,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "time_step_limit": [0.0, float("inf")],
    "tie_word_embeddings": False,
}


def train_command(work: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "elastic.cli.main", "train", "--parent", str(work / "parent"),
            "--data", str(work / "tokens"), "--out", str(out), "--budgets", "100%=1.0,75%=0.75,50%=0.5",
            "--stage1-steps", "300", "--stage1-context", "128", "--stage2-steps", "60", "--stage2-context", "256",
            "--batch-size", "16", "--force"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "slicer" / "moe_demo_checkpoint")
    ap.add_argument("--work", type=Path, default=Path("/tmp/elastic-moe-demo"))
    ap.add_argument("--pretrain-steps", type=int, default=400)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    demo = ROOT / "slicer" / "demo_checkpoint"
    (work / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo / name, work / "tokenizer" / name)
    tok = load_tokenizer(work / "tokenizer")
    build_token_shards(stdlib_corpus(max_bytes=1_500_000), tok, work / "tokens", overwrite=True)
    ids = {k: v for k, v in json.loads((demo / "config.json").read_text()).items()
           if k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}  # the dense demo's tokenizer
    config = PARENT | ids
    pretrain_parent(config, work, args.pretrain_steps)
    train_and_copy(train_command(work, work / "elastic"), work / "elastic", args.out)

if __name__ == "__main__":
    main()
