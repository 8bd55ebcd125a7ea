"""A seeded fuzzer for everything `elastic slice` reads: mutated copies of the demo checkpoint
(sharded, so it has an index) through the CLI.

Every outcome must be one of:
- exit 0 with an output byte-identical to the clean run's (the manifest's source path aside);
- exit 2 with exactly one ``error:`` message and no traceback.
Anything else (a traceback, another exit code, exit 0 with a different output) is a failure.

Mutation families: config.json, elastic_config.json and the shard index (bad values of the right
key, values swapped between keys, keys deleted, byte flips, truncation); safetensors headers
(entries of the wrong type, bad dtype / shape / data_offsets, offsets swapped or shifted, header
length rewritten, bytes flipped, file truncated or extended); the router (NaN / huge weights,
corrupt header).

Run longer: ``python tests/fuzz_checkpoint.py --cases 3000 [--seed 1]`` (or set
``ELASTIC_FUZZ_CASES`` for the test).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
from collections import Counter
from pathlib import Path

BUDGET = "50%"
BAD_VALUES = ["abc", "", [1], [], {}, None, True, False, -1, 0, 1.5, 1e400, -1e400, 10**30, float("nan"),
              [1, 2, 3], {"a": 1}]
CONFIG_KEYS = ["hidden_size", "vocab_size", "n_groups", "ssm_state_size", "conv_kernel", "mamba_num_heads",
               "mamba_head_dim", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
               "chunk_size", "layer_norm_epsilon", "time_step_limit", "hybrid_override_pattern",
               "num_hidden_layers", "use_conv_bias", "use_bias", "mlp_bias", "tie_word_embeddings",
               "residual_in_fp32", "model_type", "mlp_hidden_act", "mamba_hidden_act", "block_configs",
               "layers_block_type"]
# keys whose values another key's value may be swapped with (sizes that shape the tensors)
SIZE_KEYS = ["hidden_size", "vocab_size", "n_groups", "ssm_state_size", "conv_kernel", "mamba_num_heads",
             "mamba_head_dim", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"]
TS_BAD = [[1], [1, 2, 3], [2, 1], [-1, 1], ["a", 1], [1e400, 1e400], [float("nan"), 1], "abc", 5, [None, 1],
          [0, float("nan")], [True, 1]]


def make_source(root: Path) -> Path:
    """The demo checkpoint re-sharded into several files with an index (so index and multi-shard
    code run too). Returns the directory."""
    from safetensors.numpy import load_file

    from elastic.slicer.storage.writer import OutTensor, ShardedWriter
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT
    import torch

    src = root / "source"
    tensors = load_file(str(DEMO_CHECKPOINT / "model.safetensors"))
    with ShardedWriter(src) as w:
        w.write_tensors([OutTensor(k, "F32", tuple(v.shape), lambda v=v: [torch.from_numpy(v)])
                         for k, v in tensors.items()], max_shard_bytes=400_000)
        for f in DEMO_CHECKPOINT.iterdir():
            if f.name != "model.safetensors":
                w.add_file(f)
    return src


def _dump(obj) -> str:
    return json.dumps(obj, indent=2)  # bare NaN/Infinity for float("nan")/inf, as NVIDIA's configs have


def _set_path(obj, path: list, value) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _paths(obj, prefix=()) -> list[tuple]:
    """Every path to a leaf or container inside a JSON value (excluding the root)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _bytes_mutation(rng: random.Random, data: bytes, region: tuple[int, int] | None = None) -> bytes:
    lo, hi = region or (0, len(data))
    kind = rng.choice(["flip", "truncate", "extend", "zero"]) if region is None else rng.choice(["flip", "zero"])
    if kind == "truncate":
        return data[: rng.randrange(0, len(data))]
    if kind == "extend":
        return data + bytes(rng.randrange(1, 64))
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] = 0 if kind == "zero" else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


def _json_mutation(rng: random.Random, data: dict, keys: list[str] | None = None) -> tuple[dict | None, str]:
    """A mutated copy of a JSON object (None: leave it to a byte mutation) and what was done."""
    data = json.loads(json.dumps(data))
    kind = rng.choice(["bad", "bad", "swap", "delete", "deep"])
    if kind == "bad" and keys:
        k = rng.choice(keys)
        v = rng.choice(TS_BAD if k == "time_step_limit" and rng.random() < 0.5 else BAD_VALUES)
        data[k] = v
        return data, f"{k}={v!r:.30}"
    if kind == "swap" and keys:
        a, b = rng.sample([k for k in SIZE_KEYS if k in data] or keys, 2)
        data[a], data[b] = data.get(b), data.get(a)
        return data, f"swap {a}<->{b}"
    paths = _paths(data)
    if not paths:
        return None, "bytes"
    path = rng.choice(paths)
    if kind == "delete":
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        del parent[path[-1]]
        return data, f"delete {'.'.join(map(str, path))}"
    v = rng.choice(BAD_VALUES)
    _set_path(data, list(path), v)
    return data, f"{'.'.join(map(str, path))}={v!r:.30}"


def _header(data: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), n


def _with_header(data: bytes, header: dict, n_old: int) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n_old:]


def _safetensors_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, n = _header(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["entry", "field", "field", "swap_offsets", "shift", "delete", "length", "bytes_header",
                       "bytes_any"])
    name = rng.choice(names)
    if kind == "entry":
        header[name] = rng.choice(["", 1e20, [], None, "x", 5])
        return _with_header(data, header, n), f"{name} = junk"
    if kind == "field":
        field = rng.choice(["dtype", "shape", "data_offsets"])
        pool = {
            "dtype": ["F16", "BF16", "I32", "U8", "X", 5, None, "F64"],
            "shape": [[], [-1], "a", [1e20], [1.5], [10**30], [True], header[rng.choice(names)]["shape"]],
            "data_offsets": [[-1, 5], [5, 3], [0, 0], ["a", 1], [0, 1e20], [0], [1, 2, 3],
                             header[rng.choice(names)]["data_offsets"]],
        }[field]
        if rng.random() < 0.3:
            del header[name][field]
            return _with_header(data, header, n), f"{name}.{field} deleted"
        header[name][field] = rng.choice(pool)
        return _with_header(data, header, n), f"{name}.{field}={header[name][field]!r:.30}"
    if kind == "swap_offsets":
        other = rng.choice(names)
        header[name]["data_offsets"], header[other]["data_offsets"] = \
            header[other]["data_offsets"], header[name]["data_offsets"]
        return _with_header(data, header, n), f"swap offsets {name}<->{other}"
    if kind == "shift":
        d = rng.choice([-8, -4, -1, 1, 4, 8])
        s, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [s + d, e + d] if rng.random() < 0.5 else [s, e + d]
        return _with_header(data, header, n), f"shift {name} by {d}"
    if kind == "delete":
        del header[name]
        return _with_header(data, header, n), f"delete {name}"
    if kind == "length":
        m = rng.choice([0, 1, n - 1, n + 1, n + 8, 2**40, 2**64 - 1])
        return struct.pack("<Q", m) + data[8:], f"header length {m}"
    if kind == "bytes_header":
        return _bytes_mutation(rng, data, (8, 8 + n)), "header bytes"
    # flipped bits inside the tensor data are a valid file with other values (safetensors has no
    # checksum), so the data region is only cut short or extended
    if rng.random() < 0.5:
        return data[: rng.randrange(0, len(data))], "file truncated"
    return data + bytes(rng.randrange(1, 64)), "file extended"


def mutate(rng: random.Random, src: Path, dst: Path) -> str:
    """Make ``dst`` a copy of ``src`` (links to its files) with one file mutated; returns a label."""
    dst.mkdir()
    files = sorted(p.name for p in src.iterdir() if not p.name.startswith("."))
    for f in files:
        (dst / f).symlink_to(src / f)
    shards = [f for f in files if f.startswith("model-")]
    target = rng.choice(["config.json"] * 3 + ["elastic_config.json"] * 3 + ["model.safetensors.index.json"] * 2
                        + shards * 2 + ["router.safetensors"])
    data = (src / target).read_bytes()
    (dst / target).unlink()
    if target.endswith(".json"):
        obj = json.loads(data)
        keys = CONFIG_KEYS if target == "config.json" else None
        if target == "model.safetensors.index.json" and rng.random() < 0.5:
            name = rng.choice(list(obj["weight_map"]))
            v = rng.choice([5, [shards[0]], "../" + shards[0], "missing.safetensors", "", ".", None,
                            rng.choice(shards)])
            obj["weight_map"][name] = v
            mutated, label = obj, f"weight_map[{name}]={v!r:.30}"
        elif rng.random() < 0.2:
            mutated, label = None, "bytes"
        else:
            mutated, label = _json_mutation(rng, obj, keys)
        out = _dump(mutated).encode() if mutated is not None else _bytes_mutation(rng, data)
    elif target == "router.safetensors" and rng.random() < 0.5:
        import numpy as np
        from safetensors.numpy import load_file, save

        w = load_file(str(src / target))
        k = rng.choice(sorted(w))
        w[k] = w[k].copy()
        w[k].reshape(-1)[rng.randrange(w[k].size)] = rng.choice([np.nan, np.inf, -np.inf])
        out, label = save(w, metadata={"format": "np"}), f"router {k} non-finite/huge"
    else:
        out, label = _safetensors_mutation(rng, data)
    (dst / target).write_bytes(out)
    return f"{target}: {label}"


# config.json keys the slicer reads (with their aliases); every other key passes through as it is
INTERPRETED = {*CONFIG_KEYS, "rms_norm_eps", "mamba_conv_bias", "mamba_n_groups", "mamba_d_conv",
               "mamba_chunk_size", "mamba_dt_limit", "attention_head_dim", "dtype", "torch_dtype",
               "time_step_min", "time_step_max", "time_step_floor", "moe_latent_size", "model_type"}
# global keys the slicer copies from the parent: their value in the slice must be what
# transformers' NemotronHConfig (the independent oracle) makes of the mutated source config
COPIED = ["vocab_size", "n_groups", "ssm_state_size", "conv_kernel", "head_dim", "num_key_value_heads",
          "chunk_size", "layer_norm_epsilon", "time_step_limit", "use_conv_bias", "use_bias", "mlp_bias",
          "tie_word_embeddings", "residual_in_fp32", "mlp_hidden_act", "mamba_hidden_act"]


def _as_json(v, key: str = ""):
    """A value as JSON gives it back; the float keys as floats (1e29 and 10**29 are one clamp)."""
    v = json.loads(json.dumps(list(v) if isinstance(v, tuple) else v))
    if key in ("time_step_limit", "layer_norm_epsilon"):
        v = [float(x) for x in v] if isinstance(v, list) else float(v)
    return v


def _config_view(cfg: dict, source_config: dict) -> dict:
    """What must hold of a slice's config.json: the keys the slice sets (sizes, layout) as they
    are; pass-through keys equal to the source's; copied keys equal to transformers' reading."""
    from transformers import NemotronHConfig

    passed = {k: v for k, v in cfg.items() if k not in INTERPRETED and k != "block_configs"}
    expected = {k: v for k, v in source_config.items() if k not in INTERPRETED and k != "block_configs"}
    try:
        src = dict(source_config)
        tsl = src.get("time_step_limit")
        if isinstance(tsl, list):  # its strict typing takes list[float] only: 0 is refused, 0.0 read
            src["time_step_limit"] = [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in tsl]
        oracle = NemotronHConfig(**src)
        copied_ok = all(_as_json(cfg.get(k), k) == _as_json(getattr(oracle, k), k) for k in COPIED)
    except Exception as e:  # transformers refuses a config the slicer accepted
        copied_ok = f"transformers refuses it: {e!r:.80}"
    sliced = {k: cfg[k] for k in cfg if k not in passed and k not in COPIED}
    return {"sliced": sliced, "copied_as_transformers_reads_them": copied_ok,
            "passed_through_unchanged": json.dumps(passed, sort_keys=True) == json.dumps(expected, sort_keys=True)}


def _normalised(out: Path, source_config: dict | None = None, other_version: bool = False) -> dict[str, bytes]:
    """The output's files, with what legitimately differs between runs taken out: the manifest's
    record of the source (its path and config hash), and config.json seen through
    :func:`_config_view` when ``source_config`` is given. ``other_version``: the mutation changed a
    file the size curve's fingerprint covers, so the checkpoint's size_curve.json no longer vouches
    for it: its quality must read "not measured" (then it compares equal), and any other quality
    is kept so that it differs."""
    files = {}
    for p in sorted(out.iterdir()):
        data = p.read_bytes()
        if p.name == "slice_manifest.json":
            m = json.loads(data)
            m["source"].pop("path", None)
            m["source"].pop("config_sha256", None)
            m["quality"].pop("record", None)
            if other_version and m["quality"].get("verdict") == "not measured" and m["quality"].get("note"):
                m["quality"] = "not measured: another version of the checkpoint"
            data = json.dumps(m, sort_keys=True).encode()
        if p.name == "config.json" and source_config is not None:
            data = json.dumps(_config_view(json.loads(data), source_config), sort_keys=True).encode()
        files[p.name] = data
    return files


def _reference_slice(runner, app, case: Path, workdir: Path) -> dict[str, bytes] | None:
    """For a mutated shard that the safetensors library itself reads without complaint: the slice
    of what it reads (each shard re-saved by safetensors). None when safetensors refuses a shard."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    ref = workdir / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir()
    for p in case.iterdir():
        if p.name.startswith("model-"):
            try:
                save_file(load_file(str(p)), str(ref / p.name), metadata={"format": "pt"})
            except (SafetensorError, ValueError, TypeError, OSError):
                return None
        else:
            (ref / p.name).symlink_to(p.resolve())
    r = runner.invoke(app, ["slice", "-c", str(ref), "--budget", BUDGET, "--out", str(workdir / "reference.out")])
    try:
        return _normalised(workdir / "reference.out", json.loads((case / "config.json").read_text())) \
            if r.exit_code == 0 else None
    finally:
        shutil.rmtree(workdir / "reference.out", ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)


def run(cases: int, seed: int, workdir: Path, progress: bool = False) -> tuple[Counter, list[str]]:
    """Returns (counts by outcome, descriptions of the failures)."""
    from typer.testing import CliRunner

    from elastic.cli.main import app
    from elastic.slicer.formats.size_curve import fingerprint

    runner = CliRunner()
    src = make_source(workdir)
    clean_out = workdir / "clean"
    r = runner.invoke(app, ["slice", "-c", str(src), "--budget", BUDGET, "--out", str(clean_out)])
    assert r.exit_code == 0, r.output
    clean = _normalised(clean_out, json.loads((src / "config.json").read_text()))
    manifest = json.loads(clean["slice_manifest.json"])
    assert manifest["quality"]["verdict"] == "trained"  # the source's size_curve.json was read
    manifest["quality"] = "not measured: another version of the checkpoint"
    clean_other_version = {**clean, "slice_manifest.json": json.dumps(manifest, sort_keys=True).encode()}
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures: list[str] = []
    for k in range(cases):
        case = workdir / f"case{k}"
        label = mutate(rng, src, case)
        out = workdir / f"out{k}"
        r = runner.invoke(app, ["slice", "-c", str(case), "--budget", BUDGET, "--out", str(out)])
        if r.exit_code == 0 and r.exception is None:
            try:
                source_config = json.loads((case / "config.json").read_text())
            except ValueError:
                source_config = None
            other_version = fingerprint(case) != fingerprint(src)
            got = _normalised(out, source_config, other_version)
            expected = clean if not other_version else clean_other_version
            if got == expected:
                counts["exit 0, identical"] += 1
            elif label.startswith("model-") and got == _reference_slice(runner, app, case, workdir):
                # e.g. the offsets of two tensors of one size swapped: a valid file holding other values
                counts["exit 0, valid file with other values: same as the slice of what safetensors reads"] += 1
            else:
                counts["exit 0, different output"] += 1
                failures.append(f"case {k} ({label}): exit 0 but the output differs from the clean run")
        elif r.exit_code == 2 and r.stderr.startswith("error:") and r.stderr.count("error:") == 1 \
                and "Traceback" not in r.output and not out.exists():
            counts["exit 2, one message"] += 1
        else:
            counts["other"] += 1
            why = repr(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else r.output[-300:]
            failures.append(f"case {k} ({label}): exit {r.exit_code}: {why}")
        shutil.rmtree(case)
        shutil.rmtree(out, ignore_errors=True)
        if progress and (k + 1) % 250 == 0:
            print(f"{k + 1}/{cases}: {dict(counts)}", file=sys.stderr)
    counts["cases"] = cases
    return counts, failures


if __name__ == "__main__":
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        counts, failures = run(args.cases, args.seed, Path(d), progress=True)
    for f in failures[:50]:
        print(f)
    print(json.dumps(dict(counts)))
    sys.exit(1 if failures else 0)
