"""The kinds of slice the runtime checks build from the bundled demo (bench/runtime_matrix.py,
bench/llama_cpp_check.py): one place, so both tables name the same slices.

The demo's layers are "M-M*-M-": Mamba 0, 2, 5 (8 heads x 16, n_groups 2), MLP 1, 4, 6 (width 256),
attention 3 (4 heads, 2 KV heads).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "slicer" / "demo_checkpoint"


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    args: tuple[str, ...]  # `elastic slice` arguments; "{spec}" is replaced by the spec file
    spec: dict | None = None
    tokenizer_config: dict = field(default_factory=dict)  # keys changed in the source's tokenizer_config.json


KINDS = (
    Kind("100", "100% budget (uniform, stock nemotron_h)", ("--budget", "100%")),
    Kind("75", "75% budget (as the router chose)", ("--budget", "75%")),
    Kind("50", "50% budget (as the router chose)", ("--budget", "50%")),
    Kind("ffn", "per-layer FFN widths (spec)", ("--spec", "{spec}"), {"hidden_size": 64, "layers": [
        {"index": 1, "intermediate_size": 192}, {"index": 4, "intermediate_size": 128},
        {"index": 6, "intermediate_size": 64}]}),
    Kind("mamba", "per-layer Mamba sizes (spec; elastic's extension)", ("--spec", "{spec}"), {"hidden_size": 64, "layers": [
        {"index": 0, "mamba_num_heads": 6}, {"index": 2, "mamba_num_heads": 4, "mamba_head_dim": 12}]}),
    Kind("hd12", "uniform Mamba head dim 12 (width 96, not a multiple of 64)", ("--spec", "{spec}"),
         {"hidden_size": 64, "layers": [{"index": i, "mamba_head_dim": 12} for i in (0, 2, 5)]}),
    Kind("bf16", "100% budget cast to bf16", ("--budget", "100%", "--dtype", "bf16")),
    Kind("tf5tok", "100% with tokenizer_class TokenizersBackend (as transformers 5 saves it)", ("--budget", "100%"),
         tokenizer_config={"tokenizer_class": "TokenizersBackend"}),
)


def elastic_cli() -> list[str]:
    exe = Path(sys.executable).with_name("elastic")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("elastic")
    if found:
        return [found]
    raise SystemExit(f"the `elastic` CLI is not next to {sys.executable} nor on PATH (pip install -e . first)")


def build(kind: Kind, work: Path, source: Path = DEMO, timeout: float = 600) -> dict:
    """Slice ``kind`` into ``work/slices/KEY``; returns {"dir", "args", "manifest", "config"} or {"error"}."""
    src = source
    if kind.tokenizer_config:
        src = work / "sources" / kind.key
        if not src.exists():
            shutil.copytree(source, src)
            tc = json.loads((src / "tokenizer_config.json").read_text())
            (src / "tokenizer_config.json").write_text(json.dumps({**tc, **kind.tokenizer_config}, indent=2))
    args = list(kind.args)
    if kind.spec is not None:
        spec = work / f"spec_{kind.key}.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(kind.spec))
        args = [a.replace("{spec}", str(spec)) for a in args]
    out = work / "slices" / kind.key
    r = subprocess.run([*elastic_cli(), "slice", "-c", str(src), *args, "--out", str(out), "--force"],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode or not (out / "slice_manifest.json").is_file():
        lines = (r.stderr or r.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"elastic slice exit {r.returncode}", "args": args}
    return {"dir": out, "args": args, "manifest": json.loads((out / "slice_manifest.json").read_text()),
            "config": json.loads((out / "config.json").read_text())}
