"""Check: do llama.cpp's converter (and llama.cpp) take the slices their manifests say they do?

    python bench/llama_cpp_check.py [--sdist llama_cpp_python-0.3.36.tar.gz] [--version 0.3.36]
                                    [--env both|venv|pinned] [--outtype f32] [--no-load] [--keep]

Every slice's ``slice_manifest.json`` claims ``runtimes["llama.cpp"] = {"loads": bool, "why"/"how": str}``.
This script tests the claim against llama.cpp's own HF -> GGUF converter, fetched the way it is
distributed on PyPI: the llama-cpp-python sdist (``pip download --no-deps --no-binary :all:
llama-cpp-python==VERSION``, or ``--sdist PATH``) vendors llama.cpp under ``vendor/llama.cpp/``.
``convert_hf_to_gguf.py``, the vendored ``gguf-py`` and the local modules the converter imports (found
by reading its imports) are extracted into a temporary directory and run with this Python as a
subprocess, ``PYTHONPATH`` = the vendored gguf-py (+ a pip ``--target`` folder; nothing is installed
into this environment). Converter environments (``--env``):
- ``venv``: this Python's packages (the project's transformers, torch, ...), plus any module the
  converter needs that is missing here, pip-installed into a temporary target;
- ``pinned``: llama.cpp's own ``requirements-convert_hf_to_gguf.txt`` pins (transformers, numpy,
  sentencepiece, protobuf) pip-installed into a target that shadows this Python's; torch stays this
  Python's (its pin is a download.pytorch.org build) and gguf is the vendored one.
Slices: every kind of ``bench/slice_kinds.py`` (built with ``elastic slice`` from the bundled demo
checkpoint: its budgets, per-layer FFN widths, per-layer Mamba sizes, a Mamba width that is not a
multiple of 64, bf16, a transformers-5 tokenizer_config). For each slice and environment: the converter's
result as shipped and, when it fails only on the tokenizer's pre-tokenizer hash ("BPE pre-tokenizer
was not recognized"), again with a patched temporary copy of the converter that maps the hash it
printed (``chkhsh``) to "gpt-2" (the demo tokenizer is GPT-2's byte-level BPE). A converted GGUF's
header is read back with the vendored gguf-py and, unless ``--no-load``, loaded by llama.cpp itself:
``llama-simple`` built with cmake from the same sdist's sources (cached; a few minutes on 2 cores),
generating 4 tokens. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from slice_kinds import KINDS, build

DEFAULT_VERSION = "0.3.36"
PRE_TOKENIZER_MSG = "BPE pre-tokenizer was not recognized"
# modules the converter and gguf-py import at top level -> their PyPI names (checked for env "venv")
CONVERTER_MODULES = {"numpy": "numpy", "torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
                     "sentencepiece": "sentencepiece", "tqdm": "tqdm", "yaml": "pyyaml", "requests": "requests"}
# requirement names of llama.cpp's pins that are not installed into the "pinned" target
PIN_SKIP = {"torch": "this Python's torch (the pin is a download.pytorch.org CPU build)", "gguf": "the vendored gguf-py"}


class CheckError(SystemExit):
    """A clear, one-paragraph failure of a step the whole check depends on."""

    def __init__(self, msg: str):
        super().__init__(f"llama_cpp_check: error: {msg}")


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """(returncode, stdout+stderr); returncode 124 on timeout."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                           timeout=timeout, env=env, cwd=cwd)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        return 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + f"\n[timed out after {timeout:.0f} s]"


def tail(text: str, n: int = 15) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "is ignored: it is neither a file" not in ln]
    return "\n".join("    " + ln for ln in lines[-n:])


def pip(args: list[str], what: str, timeout: float = 1800) -> None:
    rc, out = run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], timeout)
    if rc:
        raise CheckError(f"{what} failed (pip exit {rc}): pip {' '.join(args)}\n{tail(out)}")


# ---- 1. the converter, from the llama-cpp-python sdist ------------------------------------------------------


def fetch_sdist(version: str, cache: Path) -> Path:
    rc, out = run([sys.executable, "-m", "pip", "--version"], 60)
    if rc:
        raise CheckError(f"pip is not usable with {sys.executable} (needed to download the sdist):\n{tail(out)}")
    dest = cache / "sdist"
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    pip(["download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(dest)],
        f"downloading the llama-cpp-python {version} sdist from PyPI (or pass --sdist PATH)")
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise CheckError(f"pip reported success but no llama_cpp_python-*.tar.gz is in {dest}")
    return found[0]


def safe_extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
    else:  # Python without extraction filters: refuse absolute paths and parent references ourselves
        for m in members:
            if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise CheckError(f"unsafe member in the sdist: {m.name}")
        tar.extractall(dest, members=members)


def local_imports(py: Path) -> set[str]:
    """Top-level names of every import in a file (including those inside functions)."""
    try:
        tree = ast.parse(py.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def extract_converter(sdist: Path, work: Path) -> tuple[str, Path, list[str]]:
    """Extract the converter and what it imports from the vendored tree into ``work/converter``.
    Returns (llama-cpp-python version, converter dir, the vendored paths it took)."""
    try:
        tar = tarfile.open(sdist, "r:gz")
        members = tar.getmembers()
    except (OSError, tarfile.TarError) as e:
        raise CheckError(f"cannot read {sdist} as a .tar.gz sdist: {e}") from None
    with tar:
        top = members[0].name.split("/")[0]
        vroot = f"{top}/vendor/llama.cpp/"
        version = DEFAULT_VERSION
        pkg_info = tar.extractfile(f"{top}/PKG-INFO") if f"{top}/PKG-INFO" in {m.name for m in members} else None
        if pkg_info is not None:
            m = re.search(r"^Version:\s*(\S+)", pkg_info.read().decode(errors="replace"), re.M)
            version = m.group(1) if m else version
        rel = {m.name[len(vroot):]: m for m in members if m.name.startswith(vroot) and "/.git/" not in m.name}
        if "convert_hf_to_gguf.py" not in rel:
            raise CheckError(f"{sdist.name} has no {vroot}convert_hf_to_gguf.py (not an sdist that vendors llama.cpp?)")
        # everything Python at the top of the vendored tree: top-level modules, top-level packages, gguf-py and
        # the requirement files; the imports decide below which of them the converter gets
        packages = {r.split("/")[0] for r in rel if r.count("/") == 1 and r.endswith("/__init__.py")}
        wanted = [m for r, m in rel.items() if (("/" not in r and r.endswith(".py")) or r.split("/")[0] in packages
                                                 or r.startswith(("gguf-py/", "requirements/")) or r == "requirements.txt")]
        staging = work / "vendor"
        safe_extract(tar, wanted, staging)
    src = staging / vroot
    conv = work / "converter"
    conv.mkdir(parents=True)
    taken = ["convert_hf_to_gguf.py", "gguf-py/"]
    shutil.copy2(src / "convert_hf_to_gguf.py", conv)
    shutil.copytree(src / "gguf-py", conv / "gguf-py")
    todo, seen = [conv / "convert_hf_to_gguf.py"], set()
    while todo:  # the local modules the converter imports, transitively
        for name in sorted(local_imports(todo.pop()) - seen):
            seen.add(name)
            if (src / name / "__init__.py").is_file():
                shutil.copytree(src / name, conv / name)
                taken.append(name + "/")
                todo.extend((conv / name).rglob("*.py"))
            elif (src / f"{name}.py").is_file() and name != "convert_hf_to_gguf":
                shutil.copy2(src / f"{name}.py", conv)
                taken.append(f"{name}.py")
                todo.append(conv / f"{name}.py")
    return version, conv, taken


def read_pins(req_dir: Path) -> list[str]:
    """The requirement lines of requirements-convert_hf_to_gguf.txt, following ``-r`` includes."""
    out, files = [], [req_dir / "requirements-convert_hf_to_gguf.txt"]
    while files:
        f = files.pop(0)
        if not f.is_file():
            raise CheckError(f"the sdist lacks {f.name}, which names the converter's requirements")
        for line in f.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r"):
                files.append((f.parent / line[2:].strip()).resolve())
            elif line and not line.startswith("-"):
                out.append(line)
    return out


def req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def make_envs(which: list[str], conv: Path, src_req: Path, cache: Path, work: Path) -> dict[str, dict]:
    """{env name: {"env": os.environ for the converter, "packages": versions seen, "notes": ...}}"""
    pins = read_pins(src_req)
    envs = {}
    for name in which:
        paths, notes = [str(conv / "gguf-py")], []
        if name == "venv":
            import importlib.util

            missing = [pkg for mod, pkg in CONVERTER_MODULES.items() if importlib.util.find_spec(mod) is None]
            if missing:
                spec = {req_name(p): p for p in pins}
                reqs = [spec.get(m, m) for m in missing]
                target = work / "deps-venv"
                pip(["install", "-q", "--target", str(target), *reqs], f"installing {', '.join(reqs)} into a temporary target")
                paths.append(str(target))
                notes.append("pip --target: " + ", ".join(reqs))
        else:
            reqs = [p for p in pins if req_name(p) not in PIN_SKIP]
            key = re.sub(r"[^A-Za-z0-9.=_-]+", "_", "_".join(sorted(reqs)))[:150]
            target = cache / "deps-pinned" / key
            if not (target / ".complete").is_file():
                shutil.rmtree(target, ignore_errors=True)
                pip(["install", "-q", "--target", str(target), *reqs],
                    f"installing llama.cpp's converter pins ({', '.join(reqs)}) into a temporary target (or use --env venv)")
                (target / ".complete").write_text("")
            paths.append(str(target))
            notes.append("pins: " + ", ".join(reqs) + "; " + "; ".join(f"{k}: {v}" for k, v in PIN_SKIP.items()))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false")
        probe = ("import json, importlib.metadata as md\nout = {}\n"
                 "for p in ('transformers', 'torch', 'numpy', 'tokenizers', 'sentencepiece'):\n"
                 "    try: out[p] = md.version(p)\n    except Exception: out[p] = None\n"
                 "import gguf, transformers, torch, numpy\nout['gguf_from'] = gguf.__file__\n"
                 "out['transformers_from'] = transformers.__file__\nprint(json.dumps(out))")
        rc, out = run([sys.executable, "-c", probe], 300, env=env)
        if rc:
            raise CheckError(f"the converter environment {name!r} cannot import its modules:\n{tail(out)}")
        seen = json.loads(out.strip().splitlines()[-1])
        # importlib.metadata reads the first dist-info on sys.path: the target's where it shadows this Python's
        envs[name] = {"env": env, "packages": {k: v for k, v in seen.items() if not k.endswith("_from")}, "notes": notes}
    return envs


# ---- 2. the slices ------------------------------------------------------------------------------------------


def build_slices(work: Path) -> dict[str, dict]:
    """Every kind of bench/slice_kinds.py, sliced from the demo."""
    out = {}
    for kind in KINDS:
        built = build(kind, work)
        rec = {"label": kind.label, "dir": built.get("dir"), "args": built["args"]}
        if "error" in built:
            rec["error"] = built["error"]
        else:
            rec["claim"] = built["manifest"].get("runtimes", {}).get("llama.cpp")
            rec["homogeneous"] = built["manifest"].get("homogeneous")
            rec["architectures"] = built["config"].get("architectures")
        out[kind.key] = rec
    return out


# ---- 3. conversion, the pre-tokenizer retry, the GGUF header and llama.cpp's load ---------------------------

ERR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit)|error|fatal)\b.*", re.I)


def last_error(log: str) -> str | None:
    """The last line that states an error (a Python exception, an ``error:`` line), else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and "it/s]" not in ln and "byte/s]" not in ln]
    for ln in reversed(lines):
        if ERR_LINE.match(ln) or "error loading model" in ln:
            return ln
    return lines[-1] if lines else None


def patch_gpt2(conv: Path, chkhsh: str, work: Path) -> tuple[Path | None, str]:
    """A copy of the converter whose get_vocab_base_pre() maps ``chkhsh`` to "gpt-2" (the copy only)."""
    dest = work / f"converter-gpt2-{chkhsh[:12]}"
    if dest.is_dir():
        return dest, "cached"
    shutil.copytree(conv, dest)
    for py in [dest / "convert_hf_to_gguf.py", *sorted(dest.rglob("*.py"))]:
        text = py.read_text(encoding="utf-8")
        start = text.find("def get_vocab_base_pre(")
        if start < 0:
            continue
        m = re.compile(r"^(\s*)res = None[ \t]*$", re.M).search(text, start)
        if not m:
            return None, f"no `res = None` in get_vocab_base_pre() of {py.relative_to(dest)}"
        ind = m.group(1).lstrip("\n")
        insert = f'\n{ind}if chkhsh == "{chkhsh}":\n{ind}    res = "gpt-2"  # added by bench/llama_cpp_check.py (temporary copy)'
        py.write_text(text[: m.end()] + insert + text[m.end():], encoding="utf-8")
        return dest, f"patched {py.relative_to(dest)}"
    return None, "get_vocab_base_pre() not found in the converter"


GGUF_PROBE = """
import json, sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
def val(f):
    try:
        return f.contents()
    except Exception:
        return None
fields = {k: val(f) for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.") or k == "tokenizer.ggml.pre"}
arch = fields.get("general.architecture")
keep = ("block_count", "embedding_length", "feed_forward_length", "ssm.inner_size", "ssm.group_count",
        "ssm.state_size", "ssm.time_step_rank", "expert_count", "expert_used_count", "attention.head_count",
        "attention.head_count_kv")
out = {"architecture": arch, "tensors": len(r.tensors), "file_type": fields.get("general.file_type"),
       "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
       "tensor_types": sorted({t.tensor_type.name for t in r.tensors})}
out.update({k: fields.get(f"{arch}.{k}") for k in keep if f"{arch}.{k}" in fields})
print(json.dumps(out, default=str))
"""


def convert(conv: Path, model: Path, gguf_out: Path, outtype: str, env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    rc, log = run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model), "--outfile", str(gguf_out),
                   "--outtype", outtype], timeout, env=env)
    res = {"converted": rc == 0 and gguf_out.is_file(), "seconds": round(time.perf_counter() - t0, 1)}
    if not res["converted"]:
        res["error"] = last_error(log) or f"exit {rc}"
        if PRE_TOKENIZER_MSG in log:
            m = re.search(r"chkhsh:\s*([0-9a-f]{64})", log)
            res["pretokenizer_unrecognized"] = True
            res["chkhsh"] = m.group(1) if m else None
        return res
    rc, out = run([sys.executable, "-c", GGUF_PROBE, str(gguf_out)], 300, env=env)
    res["gguf"] = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": last_error(out)}
    return res


AUTOCONFIG_PROBE = """
import json, sys
from transformers import AutoConfig
raw = json.load(open(sys.argv[1] + "/config.json"))
d = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=False).to_dict()
print(json.dumps(sorted(k for k in d if k not in raw and ("expert" in k or "moe" in k))))
"""


def autoconfig_added(model: Path, env: dict) -> list[str] | None:
    """The MoE keys the environment's transformers AutoConfig adds to a config.json that has none."""
    rc, out = run([sys.executable, "-c", AUTOCONFIG_PROBE, str(model)], 300, env=env)
    try:
        return json.loads(out.strip().splitlines()[-1]) if rc == 0 else None
    except (ValueError, IndexError):
        return None


def build_llama(sdist: Path, version: str, cache: Path, jobs: int) -> tuple[Path | None, str]:
    """llama-simple from the sdist's vendored llama.cpp, built once into the cache."""
    base = cache / f"llama.cpp-{version}"
    exe = base / "build" / "bin" / "llama-simple"
    if exe.is_file():
        return exe, "cached build"
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        return None, f"not checked: {', '.join(missing)} not found"
    shutil.rmtree(base, ignore_errors=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        top = members[0].name.split("/")[0]
        vroot = f"{top}/vendor/llama.cpp/"
        safe_extract(tar, [m for m in members if m.name.startswith(vroot) and "/.git" not in m.name[len(vroot) - 1:]],
                     base / "x")
    src = base / "src"
    (base / "x" / vroot).rename(src)
    shutil.rmtree(base / "x")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.perf_counter()
    rc, log = run(["cmake", "-S", str(src), "-B", str(base / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                   "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF"], 900)
    if rc == 0:
        rc, log = run(["cmake", "--build", str(base / "build"), "--target", "llama-simple", "-j", str(jobs)], 3600)
    if rc or not exe.is_file():
        return None, f"not checked: building llama-simple failed: {last_error(log)}"
    return exe, f"built in {time.perf_counter() - t0:.0f} s"


def load(exe: Path, gguf_path: Path, timeout: float) -> dict:
    """llama.cpp loads the GGUF and decodes 4 tokens greedily."""
    rc, log = run([str(exe), "-m", str(gguf_path), "-n", "4", "Hello"], timeout)
    ok = rc == 0 and re.search(r"decoded \d+ tokens", log) is not None
    res = {"loads": ok}
    if not ok:
        m = re.search(r"error loading model: (.*)", log)
        res["error"] = m.group(1).strip() if m else last_error(log) or f"exit {rc}"
    return res


# ---- 4. verdicts and the table ------------------------------------------------------------------------------


def works(step: dict | None, load_checked: bool) -> bool:
    return bool(step and step.get("converted") and (not load_checked or (step.get("load") or {}).get("loads")))


def gguf_oddity(g: dict | None, slice_rec: dict) -> str | None:
    if not g or "error" in g:
        return None
    archs = slice_rec.get("architectures") or []
    if (g.get("architecture") or "").endswith("_moe") and archs == ["NemotronHForCausalLM"]:
        return (f"GGUF written as {g['architecture']} (expert_count {g.get('expert_count')}, feed_forward_length "
                f"{g.get('feed_forward_length')}) for a dense model")
    return None


def describe(rec: dict, env: str, load_checked: bool) -> tuple[str, str, str, list[str]]:
    """(converter result, llama.cpp load, verdict, notes) of one slice in one environment."""
    r = rec["results"][env]
    shipped, retry = r["as_shipped"], r.get("gpt2_pre")
    notes = []
    if shipped["converted"]:
        result, final = "yes", shipped
    elif retry is not None:
        result = "no (pre-tok. hash); " + ("yes" if retry.get("converted") else "no") + " w/ gpt-2 pre"
        final = retry
        notes.append(f"as shipped: pre-tokenizer chkhsh {(shipped.get('chkhsh') or '?')[:12]}.. not recognized")
        if not retry.get("converted"):
            notes.append("w/ gpt-2 pre: " + str(retry.get("error")))
    else:
        result, final = "no", shipped
        notes.append(str(shipped.get("error")))
    if r.get("patch_note") and retry is None and shipped.get("pretokenizer_unrecognized"):
        notes.append(r["patch_note"])
    if rec.get("architectures") != ["NemotronHForCausalLM"]:
        notes.append(f"config architectures: {', '.join(rec.get('architectures') or ['?'])}")
    odd = gguf_oddity(final.get("gguf"), rec)
    if odd:
        notes.append(odd)
        if r.get("autoconfig_added"):
            notes.append(f"cause: transformers {r['transformers']}'s AutoConfig adds {', '.join(r['autoconfig_added'])} "
                         "(absent from config.json), which the converter reads as a MoE model")
    ld = final.get("load")
    if not load_checked or not final.get("converted"):
        load_s = "-"
    else:
        load_s = "yes" if ld and ld.get("loads") else "no"
        if ld and not ld.get("loads"):
            notes.append("llama.cpp: " + str(ld.get("error")))
    claim = bool((rec.get("claim") or {}).get("loads"))
    ok_shipped, ok_patched = works(shipped, load_checked), works(final, load_checked)
    what = "converts and loads" if load_checked else "converts"
    once = " once the pre-tokenizer is registered" if final is retry else ""
    if claim:
        verdict = ("claim holds" if ok_shipped else
                   "claim holds only once the pre-tokenizer is registered" if ok_patched else
                   f"CLAIM WRONG: converts{once} but llama.cpp cannot load the GGUF" if final.get("converted") else
                   f"CLAIM WRONG: the converter fails{once}")
    else:
        verdict = (f"CLAIM WRONG: it {what} as shipped" if ok_shipped else
                   f"claim holds as shipped, but it {what} once the pre-tokenizer is registered" if ok_patched else
                   "claim holds")
    if odd and not load_checked and verdict.startswith("claim holds"):
        verdict += " (but the GGUF's header looks wrong; load not checked)"
    return result, load_s, verdict, notes


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    line = lambda r: " | ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]])  # noqa: E731
    print(line(header))
    print("-+-".join(["-" * w for w in widths] + ["-" * 20]))
    for r in rows:
        print(line(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, help="a llama-cpp-python sdist (.tar.gz) instead of pip download")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version to download")
    ap.add_argument("--env", choices=["both", "venv", "pinned"], default="both", help="converter environment(s)")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0", "auto"])
    ap.add_argument("--no-load", action="store_true", help="skip building llama.cpp and loading the GGUFs")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs of the llama.cpp build")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "elastic-llama-cpp-check-cache",
                    help="download, pinned packages and llama.cpp build, reused across runs")
    ap.add_argument("--dir", type=Path, help="work directory (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per converter / llama.cpp run")
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.sdist is not None:
        if not args.sdist.is_file():
            raise CheckError(f"--sdist {args.sdist}: no such file")
        sdist = args.sdist.resolve()
    else:
        sdist = fetch_sdist(args.version, args.cache)
    if args.dir is not None:
        if args.dir.exists() and any(args.dir.iterdir()):
            raise CheckError(f"--dir {args.dir} exists and is not empty")
        args.dir.mkdir(parents=True, exist_ok=True)
        work = args.dir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="elastic-llama-cpp-check-"))
    try:
        version, conv, taken = extract_converter(sdist, work)
        print(f"llama-cpp-python {version} sdist: {sdist}")
        print(f"converter: {conv} (took vendor/llama.cpp/{{{', '.join(taken)}}})")
        req_dir = next((work / "vendor").glob("*/vendor/llama.cpp/requirements"))
        which = ["venv", "pinned"] if args.env == "both" else [args.env]
        envs = make_envs(which, conv, req_dir, args.cache, work)
        for name, e in envs.items():
            pk = e["packages"]
            print(f"env {name}: transformers {pk['transformers']}, torch {pk['torch']}, numpy {pk['numpy']}, "
                  f"tokenizers {pk['tokenizers']}, sentencepiece {pk['sentencepiece']}"
                  + (f"  ({'; '.join(e['notes'])})" if e["notes"] else ""))

        slices = build_slices(work)
        exe, load_note = (None, "not checked (--no-load)")
        if not args.no_load:
            exe, load_note = build_llama(sdist, version, args.cache, args.jobs)
        load_checked = exe is not None
        print(f"llama.cpp load check: {load_note}")

        for key, rec in slices.items():
            rec["results"] = {}
            if "error" in rec:
                continue
            for name, e in envs.items():
                out = work / "gguf" / name
                out.mkdir(parents=True, exist_ok=True)
                r = {"as_shipped": convert(conv, rec["dir"], out / f"{key}.gguf", args.outtype, e["env"], args.timeout)}
                sh = r["as_shipped"]
                if sh.get("pretokenizer_unrecognized") and sh.get("chkhsh"):
                    patched, r["patch_note"] = patch_gpt2(conv, sh["chkhsh"], work)
                    if patched is not None:
                        r["gpt2_pre"] = convert(patched, rec["dir"], out / f"{key}-gpt2pre.gguf", args.outtype,
                                                e["env"], args.timeout)
                r["transformers"] = e["packages"]["transformers"]
                final = r.get("gpt2_pre", sh)
                if gguf_oddity(final.get("gguf"), rec):
                    r["autoconfig_added"] = autoconfig_added(rec["dir"], e["env"])
                if exe is not None:
                    for step, f in (("as_shipped", f"{key}.gguf"), ("gpt2_pre", f"{key}-gpt2pre.gguf")):
                        if step in r and r[step]["converted"]:
                            r[step]["load"] = load(exe, out / f, args.timeout)
                rec["results"][name] = r

        header = ["slice kind", "env", "manifest claim", "converter result", "llama.cpp load", "notes"]
        rows, per_slice, holds, total = [], [], 0, 0
        for key, rec in slices.items():
            claim = rec.get("claim") or {}
            claim_s = ("loads" if claim.get("loads") else "does not load") if claim else "(none)"
            entry = {"slice": key, "kind": rec["label"], "elastic_slice_args": rec["args"],
                     "manifest_claim": claim or None, "homogeneous": rec.get("homogeneous"),
                     "architectures": rec.get("architectures"), "results": {}}
            if "error" in rec:
                rows.append([rec["label"], "-", "-", "slice failed", "-", rec["error"]])
                entry["slice_error"] = rec["error"]
                per_slice.append(entry)
                continue
            for name in envs:
                result, load_s, verdict, notes = describe(rec, name, load_checked)
                total += 1
                holds += verdict.startswith("claim holds")
                rows.append([rec["label"], name, claim_s, result, load_s, "; ".join([verdict, *notes])])
                r = rec["results"][name]
                entry["results"][name] = {
                    "converted": r["as_shipped"]["converted"],
                    "error": r["as_shipped"].get("error"),
                    "pretokenizer_chkhsh": r["as_shipped"].get("chkhsh"),
                    "gguf": r["as_shipped"].get("gguf"),
                    "load": r["as_shipped"].get("load"),
                    "converted_with_gpt2_pre": r["gpt2_pre"]["converted"] if "gpt2_pre" in r else None,
                    "error_with_gpt2_pre": r["gpt2_pre"].get("error") if "gpt2_pre" in r else None,
                    "gguf_with_gpt2_pre": r["gpt2_pre"].get("gguf") if "gpt2_pre" in r else None,
                    "load_with_gpt2_pre": r["gpt2_pre"].get("load") if "gpt2_pre" in r else None,
                    "autoconfig_adds_moe_keys": r.get("autoconfig_added"),
                    "verdict": verdict,
                }
            per_slice.append(entry)
        print()
        print_table(rows, header)
        print(f"\nclaims that hold as shipped: {holds}/{total}   (outtype {args.outtype}; work dir {work}"
              f"{'' if args.keep or args.dir else ', removed'})")
        result = {
            "llama_cpp_python": version,
            "sdist": str(sdist),
            "converter_files": taken,
            "outtype": args.outtype,
            "envs": {n: {"packages": e["packages"], "notes": e["notes"]} for n, e in envs.items()},
            "load_checked": load_checked,
            "load_check": load_note,
            "claims_hold_as_shipped": holds,
            "claims_checked": total,
            "slices": per_slice,
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        print(json.dumps(result, default=str))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
