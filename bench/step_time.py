"""Step time of an elastic training step at the 50% budget vs the 100% budget, same batch, one run.

    python bench/step_time.py [--hidden 512] [--batch 8] [--context 256] [--repeat 10]

The elastic forward narrows the parent's weights to the chosen prefixes (no multiplication by
zero), so a smaller budget should cost less. Times forward + backward + optimizer step of the
student under forward-KL from a fixed teacher batch; reports medians. Last line: one JSON object
with ``half_over_full`` (time ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import torch

    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
    from elastic.slicer.nn.model import build_model
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.trainer.elastic import Router, default_search_space, elastic_forward, sample
    from elastic.trainer.train import forward_kl

    d = args.hidden
    arch = Arch.from_config({
        "model_type": "nemotron_h", "vocab_size": 4096, "hidden_size": d, "hybrid_override_pattern": "M-M*-M-M-",
        "mamba_num_heads": d // 16, "mamba_head_dim": 32, "n_groups": 2, "ssm_state_size": 32, "chunk_size": 64,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": d // 8, "intermediate_size": 4 * d,
    })
    model = build_model(arch, seed=0).train()
    dims = default_search_space(arch, droppable=[])
    full = SliceSpec.full(arch).to_json(arch)
    ec = ElasticConfig((Budget("100%", 1), Budget("50%", 1)), dims, {"100%": full, "50%": full})
    router = Router(dims, 2)
    opt = torch.optim.AdamW(list(model.parameters()) + list(router.parameters()), lr=1e-4)
    x = torch.randint(0, arch.vocab_size, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = model(x)
    total = arch.param_counts()["total"]

    def half_choice():
        """The uniform point of the search space closest to 50% of the parameters."""
        import itertools

        from elastic.slicer.formats.elastic_format import spec_from_choices

        best = None
        for values in itertools.product(*(dd.choices for dd in dims)):
            picks = {dd.name: [v] * (len(dd.layers) if dd.layers else 1) for dd, v in zip(dims, values)}
            spec = SliceSpec.from_json(spec_from_choices(picks, ec, arch), arch)
            gap = abs(spec.parameters(arch) - total / 2)
            if best is None or gap < best[0]:
                best = (gap, spec)
        c = sample(router, ec, arch, 1, 1.0, 1.0, None)
        c.spec = best[1]
        return c

    choices = {"100%": sample(router, ec, arch, 0, 1.0, 1.0, None, full=True), "50%": half_choice()}
    times: dict[str, list[float]] = {k: [] for k in choices}
    for _ in range(args.repeat + 1):  # the first round warms up
        for name, choice in choices.items():
            t = time.perf_counter()
            loss = forward_kl(teacher, elastic_forward(model, ec, choice, x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    params = {k: c.spec.parameters(arch) for k, c in choices.items()}
    for k in choices:
        print(f"{k:>5}: {params[k]:>11,} parameters ({params[k] / total:.0%}), step {med[k] * 1000:.1f} ms (median of {args.repeat})")
    print(json.dumps({"full_ms": round(med["100%"] * 1000, 1), "half_ms": round(med["50%"] * 1000, 1),
                      "half_over_full": round(med["50%"] / med["100%"], 3), "params_full": params["100%"],
                      "params_half": params["50%"], "batch": args.batch, "context": args.context}))


if __name__ == "__main__":
    main()
