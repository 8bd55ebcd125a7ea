"""Check every `runtimes` claim of a slice's manifest against the client itself, for every kind of slice.

    python bench/runtime_matrix.py [--work DIR] [--no-onnx] [--llama-cpp-json FILE] [--tokens 8]

Slices: every kind in bench/slice_kinds.py, cut from the bundled demo. Clients, each run in a
subprocess with stdin closed (so an interactive prompt shows up as text, never as a hang):
- transformers (this environment's): ``AutoModelForCausalLM.from_pretrained`` without remote
  code, and with ``trust_remote_code=True`` when that fails; greedy tokens (float32) compared with
  ``elastic generate`` on the same slice; ``AutoTokenizer.from_pretrained`` without arguments
  (does it prompt, does it fail?);
- ONNX Runtime: ``elastic export --format onnx --no-parity``, then ``elastic generate --backend onnx``
  on the export, tokens compared with ``elastic generate`` on the slice (``--no-onnx`` skips it);
- llama.cpp: not run here; ``--llama-cpp-json`` takes the last line of a ``bench/llama_cpp_check.py``
  run (same slice kinds) and fills that column from it (its "pinned" environment, llama.cpp's own
  transformers pin, where present).
vLLM and sglang do not run on this machine: their claims come from rules read in their source
(slicer/formats/runtimes.py, docs/runtime-facts.md) and are listed, not checked.

A claim "holds" when the client did what the manifest says (loads and, where tokens are compared,
the same tokens). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slice_kinds import KINDS, build, elastic_cli

PROMPT = "def main"

HF_SCRIPT = r"""
import contextlib, io, json, sys, torch, transformers
path, prompt_ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = {}
def attempt(trust):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust, dtype=torch.float32)
            return m, None, buf.getvalue()
        except Exception as e:
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", buf.getvalue()
model, err, said = attempt(None)
out["plain"] = {"loads": model is not None, "error": err, "prompted": "Do you wish to run the custom code" in said}
if model is None:
    model, err, said = attempt(True)
    out["trust_remote_code"] = {"loads": model is not None, "error": err}
if model is not None:
    out["class"] = type(model).__name__
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out["tokens"] = got[0, len(prompt_ids):].tolist()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        out["tokenizer"] = {"loads": True, "class": type(tok).__name__}
    except Exception as e:
        out["tokenizer"] = {"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
out["tokenizer"]["prompted"] = "Do you wish to run the custom code" in buf.getvalue()
print(json.dumps(out))
"""


def run(cmd: list[str], timeout: float = 900) -> tuple[int, str, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def generate(path: Path, n: int, backend: str | None = None) -> dict:
    cmd = [*elastic_cli(), "generate", "-c", str(path), PROMPT, "-n", str(n), "--json"]
    rc, out, err = run(cmd + (["--backend", backend] if backend else []))
    if rc:
        return {"error": (err or out).strip().splitlines()[-1]}
    data = json.loads(out)
    return {"tokens": data["tokens"], "prompt_ids": data.get("prompt_ids")}


def prompt_ids(path: Path) -> list[int]:
    code = ("import json, sys; from elastic.slicer.formats.tokenizer import load_tokenizer; "
            "print(json.dumps(load_tokenizer(sys.argv[1]).encode(sys.argv[2])))")
    rc, out, err = run([sys.executable, "-c", code, str(path), PROMPT])
    if rc:
        raise SystemExit(f"cannot tokenize the prompt with elastic's tokenizer: {err.strip()[-300:]}")
    return json.loads(out)


def check_transformers(path: Path, ids: list[int], n: int, reference: dict) -> dict:
    rc, out, err = run([sys.executable, "-c", HF_SCRIPT, str(path), json.dumps(ids), str(n)])
    obs = last_json(out) if rc == 0 else None
    if obs is None:
        return {"ran": False, "error": (err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {rc}"}
    obs["ran"] = True
    obs["loads"] = obs["plain"]["loads"] or (obs.get("trust_remote_code") or {}).get("loads", False)
    obs["same_tokens"] = "tokens" in obs and obs["tokens"] == reference.get("tokens")
    return obs


def check_onnx(path: Path, work: Path, n: int, reference: dict) -> dict:
    out = work / "exports" / path.name
    rc, so, se = run([*elastic_cli(), "export", "-c", str(path), "--out", str(out), "--format", "onnx", "--no-parity",
                      "--force", "--json"], timeout=1800)
    if rc:
        return {"ran": True, "loads": False, "error": (se or so).strip().splitlines()[-1]}
    got = generate(out, n, backend="onnx")
    if "error" in got:
        return {"ran": True, "loads": False, "error": got["error"]}
    return {"ran": True, "loads": True, "tokens": got["tokens"], "same_tokens": got["tokens"] == reference.get("tokens")}


def llama_cpp_observed(data: dict | None, key: str) -> dict | None:
    if data is None:
        return None
    entry = next((s for s in data.get("slices", []) if s.get("slice") == key), None)
    if entry is None or not entry.get("results"):
        return None
    env = "pinned" if "pinned" in entry["results"] else next(iter(entry["results"]))
    r = entry["results"][env]
    loads = bool(r.get("converted")) and (not data.get("load_checked") or bool((r.get("load") or {}).get("loads")))
    return {"ran": True, "env": env, "loads": loads, "converted": r.get("converted"), "error": r.get("error"),
            "verdict": r.get("verdict")}


def verdict(claim: dict | None, obs: dict | None, tokens_compared: bool) -> str:
    if claim is None:
        return "no claim"
    if obs is None or not obs.get("ran"):
        return "not run here"
    if claim["loads"] != obs["loads"]:
        return "CLAIM WRONG"
    if claim["loads"] and tokens_compared and not obs.get("same_tokens"):
        return "loads, OTHER TOKENS"
    return "holds"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and ONNX Runtime run")
    ap.add_argument("--llama-cpp-json", type=Path, help="the JSON line bench/llama_cpp_check.py printed last")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens compared per client")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = (args.work or Path(tempfile.mkdtemp(prefix="elastic-runtime-matrix-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    lcpp = None
    if args.llama_cpp_json is not None:
        lcpp = last_json(args.llama_cpp_json.read_text())
        if lcpp is None:
            raise SystemExit(f"--llama-cpp-json {args.llama_cpp_json}: no JSON line found")

    rows, records = [], []
    for kind in KINDS:
        built = build(kind, work)
        rec = {"slice": kind.key, "kind": kind.label, "elastic_slice_args": built["args"]}
        if "error" in built:
            rec["slice_error"] = built["error"]
            records.append(rec)
            rows.append([kind.label, "-", "-", "-", "-", "slice failed: " + built["error"]])
            continue
        path, manifest = built["dir"], built["manifest"]
        claims = manifest["runtimes"]
        rec["config_form"] = built["config"]["model_type"]
        reference = generate(path, args.tokens)
        rec["elastic_generate"] = reference
        ids = prompt_ids(path)
        observed = {"transformers": check_transformers(path, ids, args.tokens, reference),
                    "onnxruntime": None if args.no_onnx else check_onnx(path, work, args.tokens, reference),
                    "llama.cpp": llama_cpp_observed(lcpp, kind.key), "vllm": None, "sglang": None}
        rec["runtimes"] = {}
        for client, obs in observed.items():
            claim = claims.get(client)
            v = verdict(claim, obs, client in ("transformers", "onnxruntime"))
            rec["runtimes"][client] = {"claim": claim, "observed": obs, "verdict": v}
            note = ""
            if client == "transformers" and obs and obs.get("ran"):
                tk = obs["tokenizer"]
                note = ("no remote code" if obs["plain"]["loads"] else "trust_remote_code=True") + \
                    f"; AutoTokenizer: {'loads' if tk['loads'] else 'fails'}{', PROMPTED' if tk['prompted'] else ''}"
            elif obs and obs.get("error"):
                note = str(obs["error"])[:90]
            claim_s = "-" if claim is None else ("yes" if claim["loads"] else "no")
            obs_s = "-" if not obs or not obs.get("ran") else ("loads" if obs["loads"] else "fails")
            rows.append([kind.label if client == "transformers" else "", f"{rec['config_form']}" if client ==
                         "transformers" else "", client, claim_s, obs_s, v + (f" ({note})" if note else "")])
        records.append(rec)

    header = ["slice kind", "config form", "client", "claim", "observed", "verdict"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = lambda r: " | ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]])  # noqa: E731
    print(fmt(header))
    print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    for r in rows:
        print(fmt(r))
    checked = [v["verdict"] for rec in records for v in rec.get("runtimes", {}).values()
               if v["verdict"] not in ("not run here", "no claim")]
    holds = sum(v == "holds" for v in checked)
    prompted = [rec["slice"] for rec in records
                if ((rec.get("runtimes", {}).get("transformers") or {}).get("observed") or {}).get("tokenizer", {}).get("prompted")]
    print(f"\nclaims checked: {len(checked)}, hold: {holds}; AutoTokenizer prompted on: {', '.join(prompted) or 'none'}"
          f"  (work dir {work})")
    print(json.dumps({"claims_checked": len(checked), "claims_hold": holds, "tokenizer_prompted": prompted,
                      "slices": records, "seconds": round(time.perf_counter() - t0, 1)}, default=str))


if __name__ == "__main__":
    main()
