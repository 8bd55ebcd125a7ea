"""The one precision vocabulary: every name a user may type for a precision, and everything the
product needs to know about it (bytes per element, safetensors code, torch dtype, TensorRT flag,
which device capability it needs). No torch here.

Every command's option and the TUI's control are built from this table; outputs write the
canonical ``name`` (``"bfloat16"``) except where a tool's own vocabulary is the short one
(TensorRT engine settings: ``"bf16"``).

Example:
    >>> lookup("bf16").name, lookup("half").bytes, lookup("FP32").safetensors
    ('bfloat16', 2, 'F32')
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.slicer.errors import ConfigError

AUTO = "auto"  # let the device decide: bfloat16 where it has it, else float16, else float32
KEEP = "keep"  # keep what the checkpoint stores


@dataclass(frozen=True)
class Precision:
    name: str  # canonical, as JSON outputs and config.json write it
    short: str  # NVIDIA's / TensorRT's spelling
    aliases: tuple[str, ...]  # other spellings users type
    bytes: float  # per element
    safetensors: str  # dtype code in safetensors headers
    torch: str  # attribute of the torch module
    trt_flag: str  # trtexec flag ("" for the default fp32)
    needs: str | None  # device capability it needs (an attribute of Target / DeviceProfile), None: every device

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, self.short, *self.aliases)


FLOAT32 = Precision("float32", "fp32", ("f32", "float"), 4, "F32", "float32", "", None)
FLOAT16 = Precision("float16", "fp16", ("f16", "half"), 2, "F16", "float16", "--fp16", "fp16")
BFLOAT16 = Precision("bfloat16", "bf16", (), 2, "BF16", "bfloat16", "--bf16", "bf16")
FLOAT8 = Precision("float8", "fp8", ("float8_e4m3fn", "f8"), 1, "F8_E4M3", "float8_e4m3fn", "--fp8", "fp8")
ALL = (FLOAT32, FLOAT16, BFLOAT16, FLOAT8)
# what weights can be sliced to and planned with today (fp8 weights: the precision issue)
WEIGHTS = (BFLOAT16, FLOAT16, FLOAT32)
# what ONNX graphs are written in (TensorRT builds fp16/bf16 engines from float32 graphs)
GRAPHS = (FLOAT32, FLOAT16)
# what TensorRT engines are built in
ENGINES = (BFLOAT16, FLOAT16, FLOAT32)

_BY_SPELLING = {s.lower(): p for p in ALL for s in p.spellings}


def lookup(text: str, allowed: tuple[Precision, ...] = ALL, what: str = "precision") -> Precision:
    """The precision a spelling names ("bf16", "BFloat16", "half", ...).

    Raises:
        ConfigError: unknown spelling, or one this use does not take (the message lists what it takes).
    """
    p = _BY_SPELLING.get(str(text).strip().lower())
    if p is None or p not in allowed:
        names = ", ".join(f"{q.name} ({'/'.join(q.spellings[1:])})" for q in allowed)
        why = "unknown" if p is None else "not available here"
        raise ConfigError(f"{what} {text!r} is {why}; use one of {names}")
    return p


def spellings(allowed: tuple[Precision, ...], *extra: str) -> list[str]:
    """Every accepted spelling of ``allowed``, plus ``extra`` words such as "auto" or "keep"."""
    return [*extra, *(s for p in allowed for s in p.spellings)]


def by_safetensors(code: str) -> Precision | None:
    return next((p for p in ALL if p.safetensors == code), None)


def supported(p: Precision, device) -> bool:
    """Whether ``device`` (anything with bf16/fp16/fp8 attributes) runs ``p``."""
    return p.needs is None or bool(getattr(device, p.needs, False))


def choose(requested: str | None, device, allowed: tuple[Precision, ...] = WEIGHTS) -> tuple[Precision, str | None]:
    """The precision to use on ``device`` and a note when it differs from the request.

    ``None``/"auto": the first of ``allowed`` the device runs (bfloat16, float16, float32). An
    explicit precision the device lacks falls back the same way, with a note saying so.
    """
    name = getattr(device, "name", "this device")
    if requested in (None, AUTO):
        for p in allowed:
            if supported(p, device):
                return p, None if p is allowed[0] else f"{name} has no {allowed[0].name}: using {p.name}"
        return FLOAT32, f"{name} runs none of {', '.join(p.name for p in allowed)}: using float32"
    p = lookup(requested, allowed)
    if supported(p, device):
        return p, None
    fallback, _ = choose(AUTO, device, allowed)
    return fallback, f"{name} has no {p.name} support: falling back to {fallback.name}"
