"""What a quantized checkpoint holds: Model Optimizer's unified Hugging Face layout, read from
``config.json``'s ``quantization_config`` and ``hf_quant_config.json``. No torch here.

One :class:`QuantLayout` per checkpoint says which format its Linear layers are in and which are
left unquantized (``exclude_modules``); :meth:`QuantLayout.linear_tensors` gives the tensors and
shapes one quantized Linear must have. ``Checkpoint.open`` validates against it, and the reference
model dequantizes from it (``elastic.slicer.quant.dequant``).

Layouts, as nvidia-modelopt 0.47 exports them (checked on CPU with the demo slices):

=====================  ==========================================================================
quant_algo             tensors of one Linear (out, in)
=====================  ==========================================================================
FP8                    weight F8_E4M3 (out, in); weight_scale F32 (); input_scale F32 ()
W8A8_SQ_PER_CHANNEL    weight I8 (out, in); weight_scale F32 (out,); input_scale F32 ();
                       pre_quant_scale (in,) (SmoothQuant's input smoothing)
W8A16                  weight I8 (out, in); weight_scale F32 (out,)
W4A16_AWQ              weight U8 (out/2, in): rows 2k and 2k+1 share byte row k, 2k in the low
                       nibble; weight_scale F32 (out, in/group); pre_quant_scale (in,)
NVFP4                  weight U8 (out, in/2): columns 2j and 2j+1 share byte column j, 2j in the
                       low nibble; weight_scale F8_E4M3 (out, in/16); weight_scale_2 F32 ();
                       input_scale F32 ()
=====================  ==========================================================================

Example:
    >>> q = QuantLayout.read(root, config)          # None for a float checkpoint
    >>> q.quant_algo, q.is_quantized("lm_head")
    ('W4A16_AWQ', False)
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.slicer.errors import ConfigError, Hint

HF_QUANT_CONFIG = "hf_quant_config.json"
QUANT_METHOD = "modelopt"
# Linear layers of a Nemotron-H checkpoint, by the leaf module name (lm_head is one too)
LINEAR_LEAVES = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
FLOATS = ("F32", "F16", "BF16")  # the dtype of an unquantized tensor (and of pre_quant_scale)
# absent where the exporter folded the smoothing into the norm before the Linear (AWQ on q/k/v)
OPTIONAL = ("pre_quant_scale",)
# quantization scales stay float32 as Model Optimizer writes them, whatever dtype the model takes
SCALES = ("weight_scale", "weight_scale_2", "input_scale")


@dataclass(frozen=True)
class Format:
    """One quantized weight format: how its Linear tensors look and how it computes."""

    quant_algo: str  # hf_quant_config.json's quantization.quant_algo
    precision: str  # elastic's name for it (formats.precision)
    weight_dtype: str  # safetensors code of the stored weight
    activations: str | None  # "fp8" / "int8": the input is quantized with input_scale; None: not simulated
    smoothing: bool  # a pre_quant_scale (in,) multiplies the input first


FORMATS = {f.quant_algo: f for f in (
    Format("FP8", "fp8", "F8_E4M3", "fp8", False),
    Format("W8A8_SQ_PER_CHANNEL", "int8", "I8", "int8", True),
    Format("W8A16", "int8_wo", "I8", None, False),
    Format("W4A16_AWQ", "int4", "U8", None, True),
    # NVFP4 also quantizes activations (dynamic fp4 blocks); the reference model dequantizes the
    # weights and runs the activations in float
    Format("NVFP4", "nvfp4", "U8", None, False),
)}


@dataclass(frozen=True)
class QuantLayout:
    """The quantization of a checkpoint, as the runtimes read it."""

    format: Format
    group_size: int | None  # W4A16_AWQ: input elements per weight_scale column; NVFP4: 16
    exclude_modules: tuple[str, ...]  # module names (or fnmatch patterns) left unquantized
    config: dict  # the quantization section as found (hf_quant_config.json's "quantization")

    @property
    def quant_algo(self) -> str:
        return self.format.quant_algo

    def is_quantized(self, module: str) -> bool:
        """Whether the Linear ``module`` ("backbone.layers.0.mixer.in_proj", "lm_head") is quantized:
        it is unless an exclude entry names it (exactly, or as a wildcard pattern)."""
        return not any(module == p or fnmatch.fnmatchcase(module, p) for p in self.exclude_modules)

    def linear_tensors(self, out: int, inp: int) -> dict[str, tuple[str | tuple[str, ...], tuple[int, ...]]]:
        """The tensors (leaf name -> (dtype code(s), shape)) of one quantized Linear of ``(out, inp)``."""
        algo, g = self.quant_algo, self.group_size
        if algo == "FP8":
            return {"weight": ("F8_E4M3", (out, inp)), "weight_scale": ("F32", ()), "input_scale": ("F32", ())}
        if algo == "W8A8_SQ_PER_CHANNEL":
            return {"weight": ("I8", (out, inp)), "weight_scale": ("F32", (out,)), "input_scale": ("F32", ()),
                    "pre_quant_scale": (FLOATS, (inp,))}
        if algo == "W8A16":
            return {"weight": ("I8", (out, inp)), "weight_scale": ("F32", (out,))}
        if algo == "W4A16_AWQ":
            return {"weight": ("U8", (out // 2, inp)), "weight_scale": ("F32", (out, inp // g)),
                    "pre_quant_scale": (FLOATS, (inp,))}
        assert algo == "NVFP4", algo
        return {"weight": ("U8", (out, inp // 2)), "weight_scale": ("F8_E4M3", (out, inp // g)),
                "weight_scale_2": ("F32", ()), "input_scale": ("F32", ())}

    def shape_problems(self, module: str, out: int, inp: int) -> list[str]:
        """Why a Linear of ``(out, inp)`` cannot be stored in this format (empty when it can)."""
        problems = []
        if self.quant_algo == "W4A16_AWQ" and out % 2:
            problems.append(f"{module}: {out} output rows cannot be packed two per byte (int4 needs an even number)")
        if self.group_size and inp % self.group_size:
            problems.append(f"{module}: {inp} inputs are not a multiple of the group size {self.group_size}")
        if self.quant_algo == "NVFP4" and inp % 2:
            problems.append(f"{module}: {inp} inputs cannot be packed two per byte")
        return problems

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def read(cls, root: Path, config: dict[str, Any]) -> "QuantLayout | None":
        """The layout of the checkpoint at ``root`` (``config`` is its config.json), or None when
        neither ``quantization_config`` nor ``hf_quant_config.json`` is present.

        Raises:
            ConfigError: a quantization this reader does not understand, or the two files disagree
                (every problem listed).
        """
        qc = config.get("quantization_config")
        path = root / HF_QUANT_CONFIG
        hf = None
        if path.is_file():
            try:
                hf = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read {HF_QUANT_CONFIG} ({e})", path=str(path)) from None
        if qc is None and hf is None:
            return None
        problems: list[str] = []
        section = None
        if hf is not None:
            section = hf.get("quantization") if isinstance(hf, dict) else None
            if not isinstance(section, dict):
                problems.append(f'{HF_QUANT_CONFIG} needs a "quantization" object (Model Optimizer\'s layout)')
        if qc is not None:
            if not isinstance(qc, dict):
                problems.append(f"config.json quantization_config must be an object, found {type(qc).__name__}")
            elif str(qc.get("quant_method", "")).lower() != QUANT_METHOD:
                problems.append(f"config.json quantization_config.quant_method is {qc.get('quant_method')!r}; elastic "
                                f"reads NVIDIA Model Optimizer checkpoints ({QUANT_METHOD!r}) only")
            elif section is None and not problems:
                # config.json alone (compressed-tensors style): "ignore" is the exclude list
                section = {"quant_algo": qc.get("quant_algo"), "group_size": qc.get("group_size"),
                           "exclude_modules": qc.get("ignore", []),
                           "kv_cache_quant_algo": (qc.get("kv_cache_scheme") or {}).get("type")}
            elif isinstance(section, dict) and qc.get("quant_algo") not in (None, section.get("quant_algo")):
                problems.append(f"config.json says quant_algo {qc.get('quant_algo')!r}, {HF_QUANT_CONFIG} says "
                                f"{section.get('quant_algo')!r}")
        if problems:
            raise ConfigError("quantized checkpoint not understood", problems=problems, path=str(root))
        return cls.from_section(section, source=str(path if hf is not None else root / "config.json"))

    @classmethod
    def from_section(cls, section: dict[str, Any], source: str | None = None) -> "QuantLayout":
        """The layout from a Model Optimizer ``quantization`` section (hf_quant_config.json's).

        Raises:
            ConfigError: unknown quant_algo, KV-cache quantization, a bad group size or exclude list.
        """
        problems = []
        algo = str(section.get("quant_algo") or "").upper()
        fmt = FORMATS.get(algo)
        if fmt is None:
            problems.append(f"quant_algo {section.get('quant_algo')!r} is not one elastic reads; it reads "
                            f"{', '.join(FORMATS)}")
        if section.get("kv_cache_quant_algo") not in (None, "", "none", "None"):
            problems.append(f"kv_cache_quant_algo {section['kv_cache_quant_algo']!r}: KV-cache quantization is not "
                            "supported by the reference model")
        group = section.get("group_size")
        if fmt is not None and fmt.quant_algo == "NVFP4":
            group = 16 if group is None else group
            if group != 16:
                problems.append(f"NVFP4 group_size is {group!r}; NVFP4 blocks are 16 elements")
        elif fmt is not None and fmt.quant_algo == "W4A16_AWQ":
            group = 128 if group is None else group
        else:
            group = None
        if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2):
            problems.append(f"group_size {group!r} must be an even positive integer")
        exclude = section.get("exclude_modules") or []
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            problems.append(f"exclude_modules must be a list of module names, found {exclude!r:.80}")
            exclude = []
        for e in exclude:
            if not valid_module_pattern(e):
                problems.append(f"exclude_modules entry {e!r} is not a module name or pattern (Model Optimizer 0.47 "
                                "with transformers 5 writes such names; no runtime matches them: re-quantize with "
                                "`elastic slice --precision`)")
        if problems:
            raise ConfigError("quantized checkpoint not understood", problems=problems, path=source)
        return cls(fmt, group, tuple(exclude), dict(section))


def keeps_dtype(name: str, dtype: str) -> bool:
    """Whether the tensor ``name`` of a quantized checkpoint, stored as ``dtype`` (a safetensors code),
    keeps its dtype when the model's float dtype changes: quantized weights and the quantization
    scales do; the unquantized tensors and ``pre_quant_scale`` (which runtimes read in the model's
    dtype) take the model's."""
    return dtype not in FLOATS or name.rsplit(".", 1)[-1] in SCALES


def valid_module_pattern(name: str) -> bool:
    """A dotted module name, optionally with fnmatch wildcards; no control characters or blanks."""
    return bool(name) and name.isprintable() and " " not in name and not name.startswith(".") \
        and ".." not in name


def clean_exclude_name(name: str) -> str:
    """The module name a Model Optimizer 0.47 exclude entry means.

    With transformers 5 its reverse name mapper appends a sentinel path segment, renames
    ``model`` to ``backbone`` inside the sentinel too (``"lm_head.\\x00backbone.pt_name_sentinel"``)
    and then fails to strip it (modelopt/torch/export/quant_aware_conversion.py,
    ``build_reverse_name_mapper``). The real name is everything before ``".\\x00"``.
    """
    return name.split(".\x00", 1)[0] if "\x00" in name else name


def linear_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """The Linear layers among an architecture's tensors: module name -> (out, in)."""
    found = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if module == "lm_head" or module.rsplit(".", 1)[-1] in LINEAR_LEAVES:
            found[module] = (shape[0], shape[1])
    return found


def expected_tensors(layout: QuantLayout, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """Every tensor a quantized checkpoint must hold, from the float architecture's ``shapes``.

    Returns:
        (name -> (dtype code or tuple of codes, or None for any float dtype; shape), problems): the
        Linear weights of quantized modules replaced by their quantized tensors (``OPTIONAL`` ones
        included: check them when present); problems when a module cannot be stored in the layout.
    """
    expected: dict[str, tuple[Any, tuple[int, ...]]] = {n: (None, s) for n, s in shapes.items()}
    problems: list[str] = []
    for module, (out, inp) in linear_modules(shapes).items():
        if not layout.is_quantized(module):
            continue
        problems += layout.shape_problems(module, out, inp)
        del expected[f"{module}.weight"]
        for leaf, (dtype, shape) in layout.linear_tensors(out, inp).items():
            expected[f"{module}.{leaf}"] = (dtype, shape)
    return expected, problems


def describe(layout: QuantLayout) -> dict[str, Any]:
    """JSON-ready summary (``inspect``, manifests)."""
    return {"quant_method": QUANT_METHOD, "quant_algo": layout.quant_algo, "precision": layout.format.precision,
            **({"group_size": layout.group_size} if layout.group_size else {}),
            "exclude_modules": list(layout.exclude_modules)}


MIN_INT4_GROUP = 8  # the smallest AWQ group elastic writes
NVFP4_BLOCK = 16  # elements per NVFP4 scale (formats.precision.NVFP4.block)


# ---- which models a format can hold, and with which group: the one place these rules live --------
# `elastic slice --precision` checks them before any work, and the planner (planning.memory) asks the
# same functions, so a plan offers a quantized format exactly where a slice can write it. An engine's
# own rule (say, an int4 runtime that takes group 128 only) belongs here too.


def quantized_widths(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """The Linears Model Optimizer quantizes among an architecture's tensors (every Linear but
    lm_head, routed experts included): module name -> (out, in)."""
    return {m: oi for m, oi in linear_modules(shapes).items() if m != "lm_head"}


def int4_group(shapes: dict[str, tuple[int, ...]], block: int) -> int:
    """The AWQ group size ``elastic slice --precision int4`` writes a model with: ``block`` (128)
    when it divides the input width of every quantized Linear, else the largest power of two that
    does (a narrow slice such as the demo's: 64, 16, 8). Model Optimizer packs whole groups only and
    two output rows per byte.

    Example:
        >>> int4_group({"backbone.layers.0.mixer.in_proj.weight": (132, 56)}, 128)
        8

    Raises:
        ConfigError: no group of at least MIN_INT4_GROUP divides every input width, or a Linear has
            an odd number of output rows (every such Linear listed).
    """
    linears = quantized_widths(shapes)
    widths = sorted({inp for out, inp in linears.values()})
    g = block
    while g >= MIN_INT4_GROUP and any(w % g for w in widths):
        g //= 2
    problems = [f"{m}: {out} output rows cannot be packed two per byte" for m, (out, _) in linears.items() if out % 2]
    if g < MIN_INT4_GROUP:
        problems.insert(0, f"input widths {widths}: no group of {MIN_INT4_GROUP} or more divides them all")
    if problems:
        raise ConfigError(f"int4 (AWQ) cannot hold this model: it needs every quantized Linear's input width to be "
                          f"a multiple of one group of at least {MIN_INT4_GROUP} and its output rows to be even",
                          problems=problems,
                          hint=Hint("precision", "choose fp8, int8 or int8_wo, which take any width"))
    return g


def nvfp4_check(shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ConfigError unless every quantized Linear's input width is a multiple of NVFP4's
    block of 16 (every such Linear listed)."""
    bad = [f"{m}: {inp} inputs" for m, (out, inp) in quantized_widths(shapes).items() if inp % NVFP4_BLOCK]
    if bad:
        raise ConfigError(f"nvfp4 needs Linear input widths that are multiples of {NVFP4_BLOCK}", problems=bad,
                          hint=Hint("precision", "choose fp8, int8 or int8_wo, which take any width"))


def weight_group(shapes: dict[str, tuple[int, ...]], p) -> int | None:
    """The group size of the weight scales ``elastic slice --precision`` writes for a model of
    ``shapes`` at ``p`` (a ``formats.precision.Precision``): int4, :func:`int4_group` of ``p.block``;
    nvfp4, 16; None for a format with per-tensor or per-channel scales.

    Raises:
        ConfigError: the format cannot hold this model (see :func:`int4_group`, :func:`nvfp4_check`).
    """
    if p.name == "int4":
        return int4_group(shapes, p.block)
    if p.name == "nvfp4":
        nvfp4_check(shapes)
        return NVFP4_BLOCK
    return None
