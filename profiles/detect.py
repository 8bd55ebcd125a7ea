"""Find the NVIDIA GPU in front of us: a Jetson from its device tree and /proc/meminfo, desktop and
data-center GPUs through NVML, and otherwise the host's RAM as a CPU target.

Detection never raises on what it finds on the machine: every probe that comes back empty says why
in `Detection.reasons`, and the next one is tried. No torch import.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from elastic.profiles.devices import (Capability, DeviceProfile, capability_flags, fallback_allowance, get_profile,
                                      match_profile)
from elastic.profiles.units import gib
from elastic.profiles.errors import Hint, ProfileError


@dataclass(frozen=True)
class Roots:
    """Where the machine's files are; tests point these at fixture trees."""

    proc: str = "/proc"
    etc: str = "/etc"


@dataclass(frozen=True)
class Device:
    """One device a model could run on, as measured now."""

    kind: str  # "gpu" (discrete, NVML) | "jetson" | "cpu"
    index: int | None  # NVML index for a GPU, 0 for a Jetson, None for the CPU host
    name: str  # NVML name, the Jetson profile's display name (or its model string), or the CPU
    total_bytes: int
    free_bytes: int  # NVML free for a GPU; MemAvailable for a Jetson or the CPU host
    usable_bytes: int  # what a model may plan for, before runtime overhead (see `detect`)
    unified: bool  # memory shared with the OS: what the OS leaves available is what counts
    caps: Capability  # the precisions it runs (capability_flags; the CPU host: no quantized one, for planning)
    compute_capability: str | None  # "8.9"; None for the CPU host or when unknown
    driver: str | None  # NVIDIA driver version, or "L4T R36.4.0" on a Jetson
    profile: DeviceProfile | None  # the matched device table entry
    runtime_overhead_bytes: int  # CUDA context + workspaces: a term of the memory plan
    notes: tuple[str, ...]  # how it was detected, and anything doubtful


@dataclass(frozen=True)
class Detection:
    """What `detect` found: the devices, the one to plan for, and why other probes found nothing."""

    devices: tuple[Device, ...]  # every GPU, or the CPU host alone when there is none
    chosen: Device
    reasons: tuple[str, ...]  # one per probe that found nothing: "NVML: library not found ..."


# a device whose compute capability is unknown: fp16 only, nothing quantized
_NO_CAPS = Capability(bf16=False, fp16=True, fp8=False, int8=False, int4=False, nvfp4=False)


def _err(exc: BaseException) -> str:
    """'driver not loaded (NVMLError_DriverNotLoaded)' from pynvml's exception classes."""
    return f"{str(exc).strip().lower() or 'error'} ({type(exc).__name__})"


def _read_model(path: Path) -> tuple[str | None, str]:
    """The device-tree model string, or None and why not."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "not found (not a Jetson)"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    raw = raw.rstrip(b"\x00").strip()  # device-tree strings end in NUL
    if not raw:
        return None, "unreadable (empty)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "unreadable (not UTF-8 text: corrupt?)"
    if not text.isprintable():
        return None, "unreadable (control bytes in the text: corrupt?)"
    return text, ""


def _read_meminfo(path: Path) -> tuple[dict[str, int] | None, str]:
    """MemTotal/MemAvailable/MemFree in bytes from a meminfo file, or None and why not."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        return None, f"{path} unreadable ({exc.strerror or exc})"
    mem = {}
    for m in re.finditer(r"^(MemTotal|MemAvailable|MemFree):\s+(\d+)\s*kB\s*$", text, re.M):
        mem[m.group(1)] = int(m.group(2)) * 1024
    if not mem.get("MemTotal"):
        return None, f"{path} has no MemTotal"
    return mem, ""


def _available(mem: dict[str, int], notes: list[str]) -> int:
    if "MemAvailable" in mem:
        return mem["MemAvailable"]
    notes.append("meminfo has no MemAvailable (kernel < 3.14?): used MemFree, which undercounts")
    return mem.get("MemFree", 0)


def _l4t_release(path: Path) -> tuple[str | None, str]:
    """'L4T R36.4.0' from nv_tegra_release ('# R36 (release), REVISION: 4.0, ...')."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        return None, f"L4T release unknown: {path} unreadable ({exc.strerror or exc})"
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None, f"L4T release unknown: {path} has no '# Rnn (release), REVISION: x.y' line"
    return f"L4T R{m.group(1)}.{m.group(2).rstrip('.')}", ""


def _probe_jetson(roots: Roots, reasons: list[str]) -> Device | None:
    model_path = Path(roots.proc) / "device-tree" / "model"
    model, why = _read_model(model_path)
    if model is None:
        reasons.append(f"Jetson: {model_path} {why}")
        return None
    release_path = Path(roots.etc) / "nv_tegra_release"
    driver, release_note = _l4t_release(release_path)
    if "jetson" not in model.lower() and not release_path.exists():
        reasons.append(f"Jetson: device-tree model {model!r} is not a Jetson and {release_path} is absent")
        return None
    meminfo = Path(roots.proc) / "meminfo"
    mem, why = _read_meminfo(meminfo)
    if mem is None:
        reasons.append(f"Jetson: {model!r} found but {why}: its memory is unknown")
        return None
    notes = [f"Jetson found by {model_path}: {model!r}"]
    total, free = mem["MemTotal"], _available(mem, notes)
    notes.append(
        f"memory from {meminfo}: MemTotal {gib(total, 1)}, MemAvailable {gib(free, 1)} "
        "(the GPU shares this RAM with the OS; NVML is not used on a Jetson)"
    )
    if release_note:
        notes.append(release_note)
    profile = match_profile("jetson", model, total)
    if profile is not None:
        reserve, overhead = profile.reserve_bytes, profile.runtime_overhead_bytes
        cc = profile.compute_capability
        caps = profile.caps
        notes.append(f"profile {profile.name}: the OS keeps {gib(reserve, 1)} of MemAvailable")
    else:
        reserve, overhead = fallback_allowance("jetson")
        caps, cc = _NO_CAPS, None
        notes.append(
            f"no device profile matches {model!r} with {gib(total, 1)}: fp16 only assumed, "
            f"the OS keeps {gib(reserve, 1)}; choose a device profile as the target"
        )
    usable = max(0, free - reserve)
    if usable == 0:
        notes.append(f"MemAvailable is below the {gib(reserve, 1)} the OS keeps: close programs first")
    return Device(
        kind="jetson", index=0, name=profile.display_name if profile else model,
        total_bytes=total, free_bytes=free, usable_bytes=usable, unified=True,
        caps=caps, compute_capability=cc, driver=driver, profile=profile,
        runtime_overhead_bytes=overhead, notes=tuple(notes),
    )


def _nvml_device(nvml, i: int, driver: str | None, several: bool) -> Device:
    """GPU ``i`` through NVML; raises whatever NVML raises for a GPU it cannot describe."""
    handle = nvml.nvmlDeviceGetHandleByIndex(i)
    name = nvml.nvmlDeviceGetName(handle)
    name = name.decode("utf-8", errors="replace") if isinstance(name, bytes) else str(name)
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    total, free = int(info.total), int(info.free)
    notes = [f"found by NVML as GPU {i}: {name}, {gib(free, 1)} free of {gib(total, 1)}"]
    if several:
        notes.append("NVML numbers GPUs in PCI bus order: set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA agrees")
    profile = match_profile("gpu", name, total)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        cc = f"{int(major)}.{int(minor)}"
    except Exception as exc:  # a foreign library: any failure is only a missing fact
        cc = profile.compute_capability if profile else None
        notes.append(f"compute capability not reported ({_err(exc)}); from the profile: {cc}")
    if profile is not None and cc is not None and cc != profile.compute_capability:
        notes.append(
            f"NVML reports compute capability {cc}, profile {profile.name} "
            f"says {profile.compute_capability}: NVML's is used"
        )
    if cc is not None:
        caps = capability_flags(cc)
    else:
        caps = _NO_CAPS
        notes.append("compute capability unknown: fp16 only assumed")
    if profile is not None:
        reserve, overhead = profile.reserve_bytes, profile.runtime_overhead_bytes
    else:
        reserve, overhead = fallback_allowance("gpu")
        notes.append(f"no device profile matches {name!r} with {gib(total, 1)}: conservative defaults")
    usable = max(0, min(free, total - reserve))
    if total - free > reserve:
        notes.append(f"{gib(total - free, 1)} of this GPU is already in use (desktop or other processes)")
    return Device(
        kind="gpu", index=i, name=name, total_bytes=total, free_bytes=free, usable_bytes=usable,
        unified=False, caps=caps, compute_capability=cc, driver=driver,
        profile=profile, runtime_overhead_bytes=overhead, notes=tuple(notes),
    )


def _probe_nvml(nvml, reasons: list[str]) -> list[Device]:
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py; optional
        except ImportError:
            reasons.append("NVML: library not found (pip install nvidia-ml-py)")
            return []
        except Exception as exc:
            reasons.append(f"NVML: pynvml failed to import ({_err(exc)})")
            return []
    try:
        nvml.nvmlInit()
    except Exception as exc:
        reasons.append(f"NVML: {_err(exc)}")
        return []
    try:
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        except Exception:
            driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            reasons.append(f"NVML: cannot count GPUs ({_err(exc)})")
            return []
        if count == 0:
            reasons.append("NVML: the driver is loaded but lists no GPU")
        devices = []
        for i in range(count):
            try:
                devices.append(_nvml_device(nvml, i, driver, several=count > 1))
            except Exception as exc:
                reasons.append(f"NVML: GPU {i} skipped ({_err(exc)})")
        return devices
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _cpu_name(roots: Roots) -> str:
    try:
        text = (Path(roots.proc) / "cpuinfo").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return "CPU host"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return f"CPU host ({m.group(1).strip()})" if m else "CPU host"


def _host_device(roots: Roots, reasons: list[str]) -> Device:
    profile = get_profile("cpu")
    notes = [f"no NVIDIA GPU found ({'; '.join(reasons)}): planning for the host's RAM on the CPU"]
    meminfo = Path(roots.proc) / "meminfo"
    mem, why = _read_meminfo(meminfo)
    if mem is not None:
        total, free = mem["MemTotal"], _available(mem, notes)
        notes.append(f"memory from {meminfo}: MemTotal {gib(total, 1)}, MemAvailable {gib(free, 1)}")
    else:
        try:  # not Linux, or /proc is odd: ask the C library
            page = os.sysconf("SC_PAGE_SIZE")
            total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
            notes.append(f"{why}; memory from sysconf (free pages: undercounts the page cache)")
        except (AttributeError, ValueError, OSError):
            total = free = 0
            notes.append(f"{why}, and sysconf cannot tell: host memory unknown")
    return Device(
        kind="cpu", index=None, name=_cpu_name(roots), total_bytes=total, free_bytes=free,
        usable_bytes=max(0, free - profile.reserve_bytes), unified=profile.unified,
        caps=profile.caps, compute_capability=None,
        driver=None, profile=profile, runtime_overhead_bytes=profile.runtime_overhead_bytes,
        notes=tuple(notes),
    )


def detect(gpu: int | None = None, roots: Roots | None = None, nvml=None) -> Detection:
    """Find the devices of this machine and choose the one to plan for.

    Order: a Jetson (device tree + /proc/meminfo), then discrete GPUs via NVML, then the host CPU.
    usable_bytes: a GPU min(free, total - reserve); a Jetson or the CPU host MemAvailable - reserve
    (never negative). Runtime overhead is not subtracted: it is a term of the memory plan.

    Args:
        gpu: the GPU index to choose (NVML's, 0 on a Jetson); None picks the GPU with the most
            free memory, or the CPU host when there is no GPU.
        roots: where /proc and /etc are (tests use fixture trees).
        nvml: a pynvml-like module to use; None imports pynvml (its absence is a reason).
    Returns:
        Detection(devices, chosen, reasons), e.g. ``detect().chosen.usable_bytes``.
    Raises:
        ProfileError: ``gpu`` names no GPU here (the message lists them), or the packaged device
            tables are broken. Nothing found on the machine ever raises.
    """
    roots = roots or Roots()
    reasons: list[str] = []
    jetson = _probe_jetson(roots, reasons)
    gpus = [jetson] if jetson else _probe_nvml(nvml, reasons)
    if gpu is not None:
        chosen = next((d for d in gpus if d.index == gpu), None)
        if chosen is None:
            found = ", ".join(f"{d.index}: {d.name}" for d in gpus)
            why = f"GPUs here: {found}" if gpus else f"no NVIDIA GPU found ({'; '.join(reasons)})"
            raise ProfileError(f"GPU {gpu} is not a GPU on this machine; {why}",
                               hint=Hint("gpu", "pick one of the GPUs listed"))
        return Detection(devices=tuple(gpus), chosen=chosen, reasons=tuple(reasons))
    if gpus:
        chosen = max(gpus, key=lambda d: (d.free_bytes, -d.index))
        return Detection(devices=tuple(gpus), chosen=chosen, reasons=tuple(reasons))
    host = _host_device(roots, reasons)
    return Detection(devices=(host,), chosen=host, reasons=tuple(reasons))
