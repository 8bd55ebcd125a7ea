"""Device tables and detection: Jetson fixture trees, a fake NVML, a broken machine, the real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from elastic.profiles.detect import Roots, detect
from elastic.profiles.devices import GIB, get_profile, load_profiles, match_profile
from elastic.profiles.errors import ProfileError

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
KB = 1024


# ---------------------------------------------------------------- a fake pynvml


class NVMLError(Exception):
    """pynvml raises subclasses named NVMLError_<Reason> whose str() is the reason in words."""


class NVMLError_DriverNotLoaded(NVMLError):
    def __str__(self):
        return "Driver Not Loaded"


class NVMLError_NotSupported(NVMLError):
    def __str__(self):
        return "Not Supported"


class FakeNVML:
    """The calls of nvidia-ml-py that detection uses, over a list of (name, total, free, cc)."""

    def __init__(self, gpus=(), init_error=None, broken=()):
        self.gpus, self.init_error, self.broken = list(gpus), init_error, set(broken)
        self.calls: list[str] = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self):
        return b"560.35.03"  # older pynvml returns bytes

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        if h in self.broken:
            raise NVMLError_NotSupported()
        name, total, free, cc = self.gpus[h]
        return SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.gpus[h][3]


# NVML's totals for these cards: 24564 MiB and 12288 MiB
RTX4090 = ("NVIDIA GeForce RTX 4090", 24564 * 2**20, 10 * GIB, (8, 9))
RTX3060 = ("NVIDIA GeForce RTX 3060", 12288 * 2**20, int(11.5 * GIB), (8, 6))


def bare_host(tmp_path: Path, avail_kb: int = 20_000_000) -> Roots:
    """A machine with no device tree and no L4T: only /proc/meminfo."""
    (tmp_path / "proc").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(
        f"MemTotal:       32000000 kB\nMemFree:        1000000 kB\nMemAvailable:   {avail_kb} kB\n"
    )
    return Roots(proc=str(tmp_path / "proc"), etc=str(tmp_path / "etc"))


# ---------------------------------------------------------------- the device tables


def test_every_profile_loads_and_the_brief_devices_are_there():
    profiles = load_profiles()
    wanted = {
        "orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb",
        "agx-orin-64gb", "thor-128gb", "rtx-3060", "rtx-3070", "rtx-4060", "rtx-4070",
        "rtx-4080", "rtx-4090", "rtx-5090", "rtx-a6000", "l4", "a10g", "a100-40gb",
        "a100-80gb", "h100-80gb", "cpu",
    }
    assert wanted <= set(profiles)
    for name, p in profiles.items():
        assert p.name == name and p.kind in ("jetson", "gpu", "cpu")
        assert 0 <= p.reserve_bytes + p.runtime_overhead_bytes < p.memory_bytes
        if p.kind == "jetson":
            assert p.unified and 1.0 * GIB <= p.reserve_bytes <= 4.0 * GIB
            assert 0.4 * GIB <= p.runtime_overhead_bytes <= 0.6 * GIB
        if p.kind == "gpu":
            assert not p.unified and p.reserve_bytes <= 0.5 * GIB
            assert 0.5 * GIB <= p.runtime_overhead_bytes <= 1.0 * GIB
            assert 8 * GIB <= p.memory_bytes <= 80 * GIB


@pytest.mark.parametrize(
    "name, cc, bf16, fp8, gib",
    [
        ("orin-nano-8gb", "8.7", True, False, 8),  # Orin: Ampere iGPU
        ("agx-orin-64gb", "8.7", True, False, 64),
        ("thor-128gb", "11.0", True, True, 128),  # Blackwell
        ("rtx-3060", "8.6", True, False, 12),
        ("rtx-4090", "8.9", True, True, 24),  # Ada
        ("rtx-5090", "12.0", True, True, 32),
        ("a100-40gb", "8.0", True, False, 40),
        ("h100-80gb", "9.0", True, True, 80),  # Hopper
    ],
)
def test_profile_facts(name, cc, bf16, fp8, gib):
    p = get_profile(name)
    assert (p.compute_capability, p.caps.bf16, p.caps.fp16, p.caps.fp8) == (cc, bf16, True, fp8)
    assert p.memory_bytes == gib * GIB


def test_get_profile_unknown_name_lists_the_names():
    with pytest.raises(ProfileError) as exc:
        get_profile("nope")
    assert "rtx-4090" in exc.value.message and "orin-nano-8gb" in exc.value.message
    with pytest.raises(ProfileError, match="did you mean rtx-4090"):
        get_profile("rtx-409")
    assert get_profile("RTX-4090").name == "rtx-4090"


def test_a_broken_table_reports_every_problem_with_its_file(tmp_path):
    (tmp_path / "a.toml").write_text(
        '[[device]]\nname = "Bad Name"\ndisplay_name = "x"\nkind = "gpu"\nmemory_gib = 8\n'
        'unified = false\nbf16 = true\nfp16 = true\nfp8 = true\ncompute_capability = "8.6"\n'
        "reserve_gib = 0.5\nruntime_overhead_gib = 0.8\nmatch = []\n"
        '[[device]]\nname = "gone"\nkind = "tpu"\n'
    )
    (tmp_path / "b.toml").write_text("[[device]\nname = 'x'\n")  # not TOML
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    text = "\n".join(exc.value.problems)
    assert "a.toml: device #1 (Bad Name): 'name' must be lowercase" in text
    assert "compute capability 8.6 means bf16=True, fp16=True, fp8=False" in text
    assert "'match' must not be empty" in text
    assert "a.toml: device #2 (gone): missing 'memory_gib'" in text
    assert "b.toml: not readable TOML" in text
    assert "no [fallback.gpu] table" in text


@pytest.mark.parametrize(
    "kind, model, gib, expected",
    [
        ("jetson", "NVIDIA Jetson Orin Nano Developer Kit", 3.4, "orin-nano-4gb"),
        ("jetson", "NVIDIA Jetson Orin Nano Developer Kit", 7.4, "orin-nano-8gb"),
        ("jetson", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15.3, "orin-nx-16gb"),
        ("jetson", "NVIDIA Jetson AGX Orin Developer Kit", 30.6, "agx-orin-32gb"),
        ("gpu", "NVIDIA GeForce RTX 4060 Ti", 16, "rtx-4060-ti-16gb"),  # longest match, then memory
        ("gpu", "NVIDIA GeForce RTX 4060", 8, "rtx-4060"),
        ("gpu", "NVIDIA A100-SXM4-80GB", 80, "a100-80gb"),
        ("gpu", "NVIDIA L4", 22.5, "l4"),
        ("gpu", "NVIDIA L40", 45, None),  # "nvidia l4" is not a whole word of "nvidia l40"
        ("gpu", "NVIDIA GeForce RTX 4090 Laptop GPU", 16, None),  # 16 GB is not the desktop card
        ("gpu", "NVIDIA Jetson AGX Orin Developer Kit", 64, None),  # wrong kind
        ("gpu", "Tesla T4", 15, None),
    ],
)
def test_match_profile(kind, model, gib, expected):
    p = match_profile(kind, model, int(gib * GIB))
    assert (p.name if p else None) == expected


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "tree, profile, total_kb, avail_kb, reserve_gib, l4t",
    [
        ("orin-nano-8gb", "orin-nano-8gb", 7802952, 5834568, 1.5, "L4T R36.4.0"),
        ("agx-orin-64gb", "agx-orin-64gb", 64335836, 58012344, 3.0, "L4T R36.3.0"),
        ("thor", "thor-128gb", 128530116, 119873520, 4.0, "L4T R38.2.0"),
    ],
)
def test_jetson_trees(tree, profile, total_kb, avail_kb, reserve_gib, l4t):
    nvml = FakeNVML([RTX4090])  # must not be consulted on a Jetson
    roots = Roots(proc=str(FIXTURES / tree / "proc"), etc=str(FIXTURES / tree / "etc"))
    found = detect(roots=roots, nvml=nvml)
    d = found.chosen
    assert nvml.calls == [] and found.devices == (d,)
    assert (d.kind, d.index, d.unified, d.driver) == ("jetson", 0, True, l4t)
    assert d.profile is not None and d.profile.name == profile
    assert d.total_bytes == total_kb * KB and d.free_bytes == avail_kb * KB
    assert d.usable_bytes == avail_kb * KB - int(reserve_gib * GIB)
    assert d.runtime_overhead_bytes == d.profile.runtime_overhead_bytes
    assert (d.caps.bf16, d.caps.fp8) == (True, profile == "thor-128gb")
    assert detect(gpu=0, roots=roots, nvml=nvml).chosen == d
    with pytest.raises(ProfileError, match="GPU 1 is not a GPU on this machine; GPUs here: 0: Jetson"):
        detect(gpu=1, roots=roots, nvml=nvml)


def test_jetson_usable_memory_never_negative(tmp_path):
    src = FIXTURES / "orin-nano-8gb"
    roots = bare_host(tmp_path, avail_kb=1_000_000)  # 0.95 GiB left, below the 1.5 GiB reserve
    (tmp_path / "proc" / "device-tree").mkdir()
    (tmp_path / "proc" / "device-tree" / "model").write_bytes((src / "proc/device-tree/model").read_bytes())
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 7802952 kB\nMemAvailable: 1000000 kB\n")
    d = detect(roots=roots, nvml=FakeNVML()).chosen
    assert d.kind == "jetson" and d.usable_bytes == 0
    assert any("close programs" in n for n in d.notes)


def test_two_rtx_cards_through_nvml(tmp_path):
    nvml = FakeNVML([RTX4090, RTX3060])
    found = detect(roots=bare_host(tmp_path), nvml=nvml)
    assert [d.name for d in found.devices] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060"]
    assert nvml.calls == ["init", "shutdown"]
    big, small = found.devices
    assert found.chosen == small  # the 4090 is busy: the 3060 has more free memory
    assert big.usable_bytes == 10 * GIB  # free is below total - reserve
    assert small.usable_bytes == 12288 * 2**20 - GIB // 2  # total - reserve is below free
    assert (big.profile.name, big.compute_capability, big.caps.fp8) == ("rtx-4090", "8.9", True)
    assert (small.profile.name, small.compute_capability, small.caps.fp8) == ("rtx-3060", "8.6", False)
    assert big.driver == "560.35.03" and not big.unified
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in n for n in big.notes)
    assert any("already in use" in n for n in big.notes)
    assert detect(gpu=0, roots=bare_host(tmp_path / "b"), nvml=nvml).chosen.name == RTX4090[0]


def test_gpu_index_out_of_range_lists_the_gpus(tmp_path):
    with pytest.raises(ProfileError) as exc:
        detect(gpu=2, roots=bare_host(tmp_path), nvml=FakeNVML([RTX4090, RTX3060]))
    msg = exc.value.message
    assert "GPU 2 is not a GPU" in msg and exc.value.hint.setting == "gpu" and "0: NVIDIA GeForce RTX 4090" in msg and "1: NVIDIA GeForce RTX 3060" in msg


def test_a_gpu_nvml_cannot_describe_is_skipped_with_a_reason(tmp_path):
    found = detect(roots=bare_host(tmp_path), nvml=FakeNVML([RTX4090, RTX3060], broken={0}))
    assert [d.index for d in found.devices] == [1]
    assert "NVML: GPU 0 skipped (not supported (NVMLError_NotSupported))" in found.reasons


def test_unknown_gpu_gets_conservative_defaults(tmp_path):
    found = detect(roots=bare_host(tmp_path), nvml=FakeNVML([("Tesla T4", 15 * GIB, 14 * GIB, (7, 5))]))
    d = found.chosen
    assert d.profile is None and d.caps[:3] == (False, True, False)  # bf16, fp16, fp8 of sm_75
    assert d.usable_bytes == 14 * GIB and d.runtime_overhead_bytes == GIB
    assert any("no device profile matches 'Tesla T4'" in n for n in d.notes)


def test_no_driver_and_no_jetson_is_a_cpu_target_with_reasons(tmp_path):
    nvml = FakeNVML([RTX4090], init_error=NVMLError_DriverNotLoaded())
    found = detect(roots=bare_host(tmp_path), nvml=nvml)
    d = found.chosen
    assert found.devices == (d,) and d.kind == "cpu" and d.index is None
    assert d.total_bytes == 32000000 * KB and d.usable_bytes == d.free_bytes == 20000000 * KB
    assert "NVML: driver not loaded (NVMLError_DriverNotLoaded)" in found.reasons
    assert any(r.startswith("Jetson:") and "not found" in r for r in found.reasons)
    assert "no NVIDIA GPU found" in d.notes[0] and "driver not loaded" in d.notes[0]
    with pytest.raises(ProfileError, match="GPU 0 is not a GPU on this machine; no NVIDIA GPU found"):
        detect(gpu=0, roots=bare_host(tmp_path / "b"), nvml=nvml)


def test_missing_pynvml_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    found = detect(roots=bare_host(tmp_path))
    assert found.chosen.kind == "cpu"
    assert "NVML: library not found (pip install nvidia-ml-py)" in found.reasons


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\x8f\xff\x13\x00garbage\xfe", "not UTF-8"),
        (b"", "empty"),
        (b"\x00\x00", "empty"),
        (b"NVIDIA Jetson\x07\x1b Orin", "control bytes"),
    ],
)
def test_corrupt_device_tree_falls_through_with_a_reason(tmp_path, content, why):
    roots = bare_host(tmp_path)
    (tmp_path / "proc" / "device-tree").mkdir()
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(content)
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    found = detect(roots=roots, nvml=FakeNVML(init_error=NVMLError_DriverNotLoaded()))
    assert found.chosen.kind == "cpu"
    jetson = [r for r in found.reasons if r.startswith("Jetson:")]
    assert len(jetson) == 1 and "device-tree/model unreadable" in jetson[0] and why in jetson[0]


def test_jetson_without_memtotal_falls_through(tmp_path):
    roots = bare_host(tmp_path)
    (tmp_path / "proc" / "device-tree").mkdir()
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemFree: 12 kB\n\xff\xfe")
    found = detect(roots=roots, nvml=FakeNVML(init_error=NVMLError_DriverNotLoaded()))
    assert found.chosen.kind == "cpu"  # memory from sysconf, noted
    assert any("has no MemTotal" in r for r in found.reasons)
    assert any("sysconf" in n for n in found.chosen.notes)


def test_this_machine():
    found = detect()
    d = found.chosen
    assert d.usable_bytes > 0 and d.total_bytes >= d.usable_bytes
    if d.kind == "cpu":
        assert found.reasons and d.profile.name == "cpu"


def test_detection_does_not_import_torch():
    code = (
        "import sys, elastic.profiles.detect as m; m.detect(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_one_capability_set_written_as_the_six_keys_scripts_read():
    """Precision -> capability is one table, and it agrees with the precision vocabulary; a
    profile's and a plan target's JSON keep the flags as keys of their own, in their places."""
    from elastic.profiles.devices import PRECISION_NEEDS, QUANTIZED_FLAGS, Capability
    from elastic.profiles.target import Target
    from elastic.slicer.formats import precision as P

    assert set(QUANTIZED_FLAGS) == {p.short for p in P.QUANTIZED}
    assert set(PRECISION_NEEDS) <= {p.short for p in P.ALL} and set(PRECISION_NEEDS.values()) == set(Capability._fields)
    assert {p.short: p.needs for p in P.ALL if p.needs} == PRECISION_NEEDS
    p = get_profile("thor-128gb")
    assert list(p.to_json()) == ["name", "display_name", "kind", "memory_bytes", "unified", "bf16", "fp16", "fp8",
                                 "compute_capability", "reserve_bytes", "runtime_overhead_bytes", "match", "source",
                                 "int8", "int4", "nvfp4", "runtimes", "engines"]
    t = Target.from_profile(p)
    assert list(t.to_json()) == ["name", "kind", "usable_bytes", "overhead_bytes", "bf16", "fp16", "fp8", "unified",
                                 "source", "notes", "profile", "int8", "int4", "nvfp4", "runtimes", "engines"]
    assert t.caps is p.caps and {k: t.to_json()[k] for k in Capability._fields} == p.caps._asdict()
    assert p.caps == (True, True, True, True, True, True)  # sm_110: every precision
    assert [P.supported(q, t) for q in (P.FP8, P.NVFP4, P.Q4_K_M)] == [True, True, True]
    assert not P.supported(P.FP8, Target.from_profile(get_profile("orin-nano-8gb")))
