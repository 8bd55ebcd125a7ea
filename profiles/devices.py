"""Device profiles: the tables in profiles/data/*.toml, validated, and the lookup of a detected
device in them. No torch, no slicer."""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from elastic.profiles.errors import ProfileError
from elastic.profiles.units import GIB

DATA_DIR = Path(__file__).parent / "data"
KINDS = ("jetson", "gpu", "cpu")
# A name match is refused when the measured memory is this far from the profile's: a laptop
# "RTX 4090" (16 GB) is not the desktop card, and a wrong profile is worse than none.
MATCH_TOLERANCE = 0.25


class Capability(NamedTuple):
    """The precisions a device runs in hardware: the one capability set of a DeviceProfile, a
    detected Device and a planning Target (``.caps``), decided once (``capability_flags``)."""

    bf16: bool
    fp16: bool
    fp8: bool
    int8: bool  # int8 tensor cores: W8A8 SmoothQuant, int8 weight-only
    int4: bool  # W4A16 AWQ kernels
    nvfp4: bool  # Blackwell's fp4 tensor cores

    def runs(self, precision: str) -> bool:
        """Whether a precision, by its short name (``formats.precision``: "bf16", "int4", ...), runs
        here; one that needs no capability (fp32, llama.cpp's GGUF types) runs everywhere."""
        flag = PRECISION_NEEDS.get(precision)
        return flag is None or getattr(self, flag)


# The one map of precision -> the capability it needs, by the precision's short name
# (``formats.precision.Precision.needs`` reads it); a precision not here needs none.
PRECISION_NEEDS = {"fp16": "fp16", "bf16": "bf16", "float8": "fp8", "fp8": "fp8", "int8": "int8",
                   "int8_wo": "int8", "int4": "int4", "nvfp4": "nvfp4"}
# the quantized precisions (Model Optimizer's) a profile's `runtimes` table may name -> the flag each needs
QUANTIZED_FLAGS = {p: PRECISION_NEEDS[p] for p in ("fp8", "nvfp4", "int8", "int8_wo", "int4")}
# what each quantized capability means in hardware, in words (the thresholds of capability_flags)
CAPABILITY_WORDS = {"fp8": "compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
                    "nvfp4": "a Blackwell GPU (compute capability 10.0 or newer)",
                    "int8": "int8 tensor cores (compute capability 7.2 or newer)",
                    "int4": "compute capability 7.5 or newer"}


def flat_caps(record: dict, caps: Capability, after: tuple[str, str]) -> dict:
    """``record`` (a record's ``asdict``) with ``caps`` written as the six keys its JSON form has
    always had: bf16/fp16/fp8 after the key ``after[0]``, int8/int4/nvfp4 after ``after[1]``."""
    flags = caps._asdict()
    out = {}
    for k, v in record.items():
        if k != "caps":
            out[k] = v
        if k == after[0]:
            out.update((f, flags[f]) for f in ("bf16", "fp16", "fp8"))
        if k == after[1]:
            out.update((f, flags[f]) for f in ("int8", "int4", "nvfp4"))
    return out


@dataclass(frozen=True)
class DeviceProfile:
    """One known device, as the device tables describe it."""

    name: str  # the --target key, lowercase with dashes: "orin-nano-8gb", "rtx-4090"
    display_name: str  # for people: "Jetson Orin Nano 8GB"
    kind: str  # "jetson" | "gpu" | "cpu"
    memory_bytes: int  # nominal total memory; detection measures the real one
    unified: bool  # the GPU shares system RAM with the OS (Jetson), or the model lives in RAM (CPU)
    caps: Capability  # the precisions it runs (its compute capability's; the CPU host plans no quantized one)
    compute_capability: str | None  # "8.7"; None for the CPU host
    reserve_bytes: int  # kept by the OS/desktop/driver; the model may never plan to use it
    runtime_overhead_bytes: int  # CUDA context + cuBLAS/TensorRT workspace
    match: tuple[str, ...]  # lowercase substrings of an NVML name or a device-tree model string
    source: str  # the TOML file the entry came from
    # runtimes that load Model Optimizer's checkpoints in each quantized precision here, by the
    # precision's short name ("int4"); what their documentation says, not a promise for every model
    runtimes: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # engines that run a model here, preferred first (--runtime names): the entry's own `engines`,
    # else its kind's [engines] table; what each takes is slicer/planning/engines.py's rule
    engines: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        """What a model may plan to use on this device when nothing is measured (--target)."""
        return self.memory_bytes - self.reserve_bytes

    def to_json(self) -> dict:
        """The record as `elastic profiles --json` prints it: the six flags as keys of their own."""
        return flat_caps(asdict(self), self.caps, after=("unified", "source"))


def capability_flags(cc: str) -> Capability:
    """The precisions CUDA compute capability ``cc`` (e.g. "8.7") runs in hardware.

    bf16 from Ampere (8.0); fp8 tensor cores from Ada (8.9), Hopper (9.0) and Blackwell (10.x+);
    int8 tensor cores from Xavier (7.2) and Turing (7.5); int4 AWQ (W4A16) kernels from Turing
    (vLLM's AWQ needs 7.5); nvfp4 tensor cores on Blackwell only (10.x datacenter, 11.0 Thor,
    12.x RTX 50). Jetson Orin (8.7): bf16, int8 and int4, no fp8 or nvfp4. Raises ValueError for a
    malformed string.
    """
    major, minor = (int(x) for x in cc.split("."))
    v = (major, minor)
    return Capability(bf16=v >= (8, 0), fp16=v >= (5, 3), fp8=v >= (8, 9), int8=v >= (7, 2), int4=v >= (7, 5),
                      nvfp4=v >= (10, 0))


# key -> (accepted types, required)
_NUM = (int, float)
_FIELDS = {
    "name": (str, True),
    "display_name": (str, True),
    "kind": (str, True),
    "memory_gib": (_NUM, True),
    "unified": (bool, True),
    "bf16": (bool, True),
    "fp16": (bool, True),
    "fp8": (bool, True),
    "int8": (bool, False),  # optional: absent, they follow compute_capability (the CPU host: false)
    "int4": (bool, False),
    "nvfp4": (bool, False),
    "runtimes": (dict, False),
    "engines": (list, False),
    "compute_capability": (str, False),
    "reserve_gib": (_NUM, True),
    "runtime_overhead_gib": (_NUM, True),
    "match": (list, True),
}
_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_CC = re.compile(r"\d+\.\d+")


def _bytes(gib: float) -> int:
    return int(round(gib * GIB))


def _flags(e: dict) -> Capability:
    """An entry's capability set; int8/int4/nvfp4 left out follow its compute capability (an
    entry that passed the type checks)."""
    cc = e.get("compute_capability")
    derived = capability_flags(cc)._asdict() if cc and _CC.fullmatch(cc) else {}
    return Capability(**{k: e[k] if k in e else derived.get(k, False) for k in Capability._fields})


def _check_entry(e: dict) -> list[str]:
    """Every problem of one [[device]] table (an empty list: it is valid)."""
    errs = [f"unknown key {k!r}" for k in e if k not in _FIELDS]
    for key, (types, required) in _FIELDS.items():
        if key not in e:
            if required:
                errs.append(f"missing {key!r}")
        elif not isinstance(e[key], types) or (isinstance(e[key], bool) and types is not bool):
            errs.append(f"{key!r} has the wrong type ({type(e[key]).__name__})")
    if errs:
        return errs
    kind, cc = e["kind"], e.get("compute_capability")
    if not _NAME.fullmatch(e["name"]):
        errs.append("'name' must be lowercase words joined by dashes (e.g. 'rtx-4090')")
    if kind not in KINDS:
        errs.append(f"'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    if e["memory_gib"] <= 0:
        errs.append("'memory_gib' must be > 0")
    if e["reserve_gib"] < 0 or e["runtime_overhead_gib"] < 0:
        errs.append("'reserve_gib' and 'runtime_overhead_gib' must be >= 0")
    elif e["reserve_gib"] + e["runtime_overhead_gib"] >= e["memory_gib"]:
        errs.append("'reserve_gib' + 'runtime_overhead_gib' leave nothing of 'memory_gib'")
    if kind == "jetson" and not e["unified"]:
        errs.append("a Jetson shares system RAM: 'unified' must be true")
    if kind == "gpu" and e["unified"]:
        errs.append("a discrete GPU has its own memory: 'unified' must be false")
    if any(not isinstance(m, str) or not m or m != m.lower() for m in e["match"]):
        errs.append("'match' must hold non-empty lowercase strings")
    if kind in ("jetson", "gpu") and not e["match"]:
        errs.append("'match' must not be empty for a GPU (detection could never find it)")
    if kind == "cpu" and cc is not None:
        errs.append("a CPU host has no 'compute_capability'")
    if kind in ("jetson", "gpu"):
        if cc is None or not _CC.fullmatch(cc):
            errs.append("'compute_capability' must look like '8.9'")
        elif capability_flags(cc) != _flags(e):
            errs.append(f"compute capability {cc} means "
                        + ", ".join(f"{k}={v}" for k, v in capability_flags(cc)._asdict().items()))
    if kind == "cpu" and any(getattr(_flags(e), k) for k in ("fp8", "int8", "int4", "nvfp4")):
        errs.append("the CPU host plans no quantized weights: 'fp8', 'int8', 'int4' and 'nvfp4' must be false")
    if any(not isinstance(n, str) or not n for n in e.get("engines", [])):
        errs.append("'engines' must hold non-empty engine names")
    for precision, names in e.get("runtimes", {}).items():
        if precision not in QUANTIZED_FLAGS:
            errs.append(f"'runtimes' key {precision!r} is not one of {', '.join(QUANTIZED_FLAGS)}")
        elif not _flags(e).runs(precision):
            errs.append(f"'runtimes' lists {precision} but the device does not run it")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            errs.append(f"'runtimes.{precision}' must be a non-empty list of names")
    return errs


def _profile(e: dict, source: str, engines: dict[str, tuple[str, ...]] | None = None) -> DeviceProfile:
    return DeviceProfile(
        name=e["name"],
        display_name=e["display_name"],
        kind=e["kind"],
        memory_bytes=_bytes(e["memory_gib"]),
        unified=e["unified"],
        caps=_flags(e),
        runtimes={k: tuple(v) for k, v in e.get("runtimes", {}).items()},
        engines=tuple(e["engines"]) if "engines" in e else (engines or {}).get(e["kind"], ()),
        compute_capability=e.get("compute_capability"),
        reserve_bytes=_bytes(e["reserve_gib"]),
        runtime_overhead_bytes=_bytes(e["runtime_overhead_gib"]),
        match=tuple(e["match"]),
        source=source,
    )


def _read_engines(table, source: str, engines: dict[str, tuple[str, ...]]) -> list[str]:
    """Add one file's [engines] table (kind -> engine names) to ``engines``; its problems."""
    if not isinstance(table, dict):
        return [f"{source}: [engines] must be a table of kind = [engine names]"]
    problems = []
    for kind, names in table.items():
        if kind not in KINDS:
            problems.append(f"{source}: [engines] key {kind!r} is not one of {', '.join(KINDS)}")
        elif not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            problems.append(f"{source}: [engines] {kind} must be a non-empty list of engine names")
        elif kind in engines:
            problems.append(f"{source}: [engines] {kind} is defined twice")
        else:
            engines[kind] = tuple(names)
    return problems


def kind_engines(kind: str) -> tuple[str, ...]:
    """The engines of a device of ``kind`` that no profile describes (a detected, unmatched GPU)."""
    return _default()[2].get(kind, ())


def _load(data_dir: Path) -> tuple[dict[str, DeviceProfile], dict[str, tuple[int, int]], dict[str, tuple[str, ...]]]:
    """Profiles by name and the fallback (reserve, overhead) bytes by kind; every problem at once."""
    files = sorted(Path(data_dir).glob("*.toml"))
    if not files:
        raise ProfileError("no device tables (*.toml) found; reinstall elastic", path=str(data_dir))
    problems: list[str] = []
    profiles: dict[str, DeviceProfile] = {}
    fallbacks: dict[str, tuple[int, int]] = {}
    engines: dict[str, tuple[str, ...]] = {}  # kind -> engine names, from the [engines] tables
    for path in files:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path.name}: not readable TOML ({exc})")
            continue
        problems += [f"{path.name}: unknown table {k!r}" for k in doc if k not in ("device", "fallback", "engines")]
        entries = doc.get("device", [])
        for i, e in enumerate(entries if isinstance(entries, list) else []):
            label = e.get("name", "?") if isinstance(e, dict) else "?"
            errs = _check_entry(e) if isinstance(e, dict) else ["not a table"]
            problems += [f"{path.name}: device #{i + 1} ({label}): {err}" for err in errs]
            if errs:
                continue
            if label in profiles:
                problems.append(f"{path.name}: {label!r} is already defined in {profiles[label].source}")
            profiles[label] = _profile(e, path.name)
        problems += _read_engines(doc.get("engines", {}), path.name, engines)
        for kind, fb in doc.get("fallback", {}).items():
            ok = isinstance(fb, dict) and set(fb) == {"reserve_gib", "runtime_overhead_gib"}
            ok = ok and all(isinstance(v, _NUM) and not isinstance(v, bool) and v >= 0 for v in fb.values())
            if kind not in ("jetson", "gpu") or not ok:
                problems.append(
                    f"{path.name}: [fallback.{kind}] must be jetson or gpu with "
                    "reserve_gib and runtime_overhead_gib >= 0"
                )
            elif kind in fallbacks:
                problems.append(f"{path.name}: [fallback.{kind}] is defined twice")
            else:
                fallbacks[kind] = (_bytes(fb["reserve_gib"]), _bytes(fb["runtime_overhead_gib"]))
    problems += [f"no [fallback.{k}] table in any file" for k in ("jetson", "gpu") if k not in fallbacks]
    profiles = {k: p if p.engines else replace(p, engines=engines.get(p.kind, ())) for k, p in profiles.items()}
    if problems:
        raise ProfileError(f"{len(problems)} problem(s) in the device tables", problems, str(data_dir))
    order = sorted(profiles.values(), key=lambda p: (KINDS.index(p.kind), p.memory_bytes, p.name))
    return {p.name: p for p in order}, fallbacks, engines


@functools.lru_cache(maxsize=None)
def _default() -> tuple[dict[str, DeviceProfile], dict[str, tuple[int, int]], dict[str, tuple[str, ...]]]:
    return _load(DATA_DIR)


def load_profiles(data_dir: Path | str | None = None) -> dict[str, DeviceProfile]:
    """All device profiles by name, validated.

    Args:
        data_dir: a folder of *.toml device tables; None means the packaged ones (read once).
    Returns:
        a new dict name -> DeviceProfile: Jetsons, then GPUs, then the CPU host, each by memory.
    Raises:
        ProfileError listing every problem of every file, each naming its file.
    """
    if data_dir is None:
        return dict(_default()[0])
    return _load(Path(data_dir))[0]


def fallback_allowance(kind: str) -> tuple[int, int]:
    """(reserve_bytes, runtime_overhead_bytes) for a detected "gpu" or "jetson" that no profile
    matches: conservative defaults from the [fallback.<kind>] tables."""
    return _default()[1][kind]


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name`` (case-insensitive), e.g. ``get_profile("rtx-4090")``.

    Raises:
        ProfileError: unknown name; the message offers close matches and lists every name.
    """
    profiles = load_profiles()
    key = name.strip().lower()
    if key in profiles:
        return profiles[key]
    close = difflib.get_close_matches(key, list(profiles), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ProfileError(f"unknown device {name!r}; {hint}known devices: {', '.join(profiles)}")


def _found(needle: str, text: str) -> bool:
    """``needle`` occurs in ``text`` as whole words: "nvidia l4" is not in "nvidia l40s"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", text) is not None


def match_profile(
    kind: str,
    model_string: str,
    total_bytes: int | None,
    profiles: dict[str, DeviceProfile] | None = None,
) -> DeviceProfile | None:
    """The profile of a detected device, or None when none fits.

    Args:
        kind: "gpu" or "jetson"; only profiles of that kind are considered.
        model_string: the NVML name ("NVIDIA GeForce RTX 4090") or the device-tree model string.
        total_bytes: measured total memory; picks among variants sharing a name (Orin Nano 4 vs
            8 GB) and refuses a match more than MATCH_TOLERANCE away. None or 0: the smallest
            variant (the conservative guess), no refusal.
        profiles: the table to search; None means the packaged one.
    Returns:
        the profile whose longest whole-word ``match`` string occurs in the model string, ties
        broken by the memory nearest to total_bytes.
    """
    text = " ".join(model_string.lower().split())
    scored = []
    for p in (profiles if profiles is not None else load_profiles()).values():
        hits = [len(m) for m in p.match if _found(m, text)]
        if p.kind == kind and hits:
            scored.append((max(hits), p))
    if not scored:
        return None
    best = max(score for score, _ in scored)
    candidates = [p for score, p in scored if score == best]
    if not total_bytes:
        return min(candidates, key=lambda p: p.memory_bytes)
    p = min(candidates, key=lambda p: (abs(p.memory_bytes - total_bytes), p.memory_bytes))
    if abs(p.memory_bytes - total_bytes) > MATCH_TOLERANCE * p.memory_bytes:
        return None
    return p
