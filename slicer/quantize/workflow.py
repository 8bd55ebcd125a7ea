"""Quantized slices through NVIDIA Model Optimizer: a float slice in, a Model Optimizer unified
Hugging Face checkpoint out (what vLLM, TensorRT-LLM and SGLang read), written by
:class:`~elastic.slicer.storage.writer.ShardedWriter` under the output rules of every command.

The steps (each a function, so tests can look between them): load the float slice in
transformers (:func:`load_hf`), calibrate on the bundled train-split text and quantize with the
precision's Model Optimizer config (:func:`quantize_model`), export with ``export_hf_checkpoint``
to a temporary directory, then write the weights, ``config.json`` (the slice's own form, plus
``quantization_config``), ``hf_quant_config.json`` (exclude names repaired), the tokenizer, the
remote code the form needs and ``slice_manifest.json``. Nothing partial is left on failure.

``nvidia-modelopt``, ``transformers`` and ``requests`` are optional (``pip install
'elastic[modelopt]'``) and imported only here, when a quantization runs.

Example:
    >>> r = quantize_slice("./model-50", "./model-50-int4", "int4")   # the demo's 50% budget in bf16
    >>> r.manifest["quantization"]["quant_algo"], r.manifest["quantization"]["group_size"], r.weights_bytes
    ('W4A16_AWQ', 16, 172052)
    >>> r = slice_and_quantize(ckpt, "./model-6B-fp8", "fp8", budget="6B")   # slice in float32, then quantize
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.slicer import remote_code
from elastic.slicer.errors import ConfigError, ElasticError, MissingDependencyError, debug_enabled
from elastic.slicer.formats.arch import read_config
from elastic.slicer.formats.precision import QUANTIZED, WEIGHTS, Precision, lookup
# int4_group is imported from here by callers (tests/test_quant.py)
from elastic.slicer.quant.layout import (HF_QUANT_CONFIG, QuantLayout, clean_exclude_name, describe, int4_group,
                                         keeps_dtype, weight_group)

INSTALL = "pip install 'elastic[modelopt]'"
MANIFEST_NAME = "slice_manifest.json"
CALIBRATION_SAMPLES = 16  # windows of train-split text
CALIBRATION_LEN = 256  # tokens per window
CALIBRATION_BATCH = 4  # windows per forward pass


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    precision: str  # canonical name: "int4", "fp8", ...
    bytes_written: int  # every file
    weights_bytes: int  # the safetensors shards
    manifest: dict[str, Any]  # slice_manifest.json as written

    @property
    def parameters(self) -> int:
        """The model's parameter count (as ``SliceResult.parameters``: the float model's)."""
        return self.manifest["parameters"]["total"]

    def to_json(self) -> dict[str, Any]:
        """``elastic slice --precision ... --json``: what was written and who loads it."""
        m = self.manifest
        return {"out": str(self.out), "precision": self.precision, "parameters": m["parameters"]["total"],
                "bytes_written": self.bytes_written, "weights_bytes": self.weights_bytes,
                **{k: m.get(k) for k in ("budget", "dtype", "layer_pattern", "homogeneous")},
                "quantization": {k: v for k, v in m["quantization"].items() if k != "exclude_modules"},
                "runtimes": m["runtimes"]}


# ---- checks that run before any work ------------------------------------------------------------


def quantized_precision(name: str | Precision) -> Precision:
    """The quantized precision a spelling names ("int4", "awq", "FP8", ...).

    Raises:
        ConfigError: unknown, or a float precision.
    """
    return name if isinstance(name, Precision) else lookup(name, QUANTIZED, "quantized precision")


def require_modelopt() -> None:
    """Raise MissingDependencyError (with the install line) unless Model Optimizer, transformers and
    requests import."""
    from importlib.util import find_spec

    # find_spec of the top-level names imports nothing (importing modelopt takes seconds and warns)
    missing = [package for module, package in (("modelopt", "nvidia-modelopt"), ("transformers", "transformers"),
                                               ("requests", "requests")) if find_spec(module) is None]
    if missing:
        raise MissingDependencyError(f"quantizing needs {', '.join(missing)} (NVIDIA Model Optimizer and what it "
                                     f"runs with): {INSTALL}")


def require_device(p: Precision, device: str | None = None) -> str:
    """The device calibration runs on (``device``, else CUDA when present, else the CPU). Every
    format calibrates on the CPU with Model Optimizer 0.47, nvfp4 included (checked here on the demo:
    quantize, export, load, generate)."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# what elastic's reference model (generate, eval, the smoke test, the export's parity) simulates of each format
SIMULATED = {
    "fp8": "weights and activations (input_scale)", "int8": "weights and activations (input_scale)",
    "int8_wo": "weights (a weight-only format)", "int4": "weights (a weight-only format)",
    "nvfp4": "weights only: nvfp4's activation quantization is not simulated, so elastic's outputs approximate "
             "a W4A4 runtime's",
}


def modelopt_config(p: Precision, group: int | None = None) -> dict:
    """The Model Optimizer config of ``p`` (``mtq.<p.modelopt_config>``), with the int4 group size set."""
    mtq = _import("modelopt.torch.quantization")
    cfg = copy.deepcopy(getattr(mtq, p.modelopt_config))
    if group is not None:
        entries = cfg["quant_cfg"] if isinstance(cfg["quant_cfg"], list) else [cfg["quant_cfg"]]
        for e in entries:
            sizes = (e.get("cfg") or {}).get("block_sizes") if isinstance(e, dict) else None
            if e.get("quantizer_name") == "*weight_quantizer" and sizes:
                sizes[-1] = group
    return cfg


# ---- the steps ---------------------------------------------------------------------------------


def load_hf(model_dir: str | Path, device: str = "cpu"):
    """The float slice as a transformers model in float32 (remote code for the Puzzle and extension
    forms: elastic's own modeling file, shipped in the directory)."""
    import torch

    config = read_config(Path(model_dir) / "config.json")
    auto = _import("transformers").AutoModelForCausalLM
    with _quiet():
        model = auto.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=remote_code.needs_code(config))
    return model.to(device).eval()


def quantize_model(model, p: Precision, ids, group: int | None = None, progress: Progress | None = None):
    """Calibrate ``model`` on ``ids`` (n, L) and quantize it in place with ``p``'s Model Optimizer
    config: afterwards its forward is Model Optimizer's simulated quantization of the model as it
    will be exported.

    Model Optimizer's exporter first fuses the Linears that share an input
    (``requantize_resmooth_fused_llm_layers``: one averaged smoothing scale and one input amax for
    q/k/v, the AWQ scale of a shared input folded into the norm before it), which changes the
    numerics of int8 and int4 models; it is run here, on the simulated model, so that the model
    this returns computes what the exported checkpoint computes (the exporter's own call then
    finds nothing left to fuse).
    """
    import torch

    mtq = _import("modelopt.torch.quantization")
    fuse_shared_inputs = _import("modelopt.torch.export.unified_export_hf").requantize_resmooth_fused_llm_layers
    device = next(model.parameters()).device
    batches = list(ids.split(CALIBRATION_BATCH))

    def forward_loop(m) -> None:  # Model Optimizer may run it more than once (AWQ searches its scales)
        with torch.no_grad():
            for k, batch in enumerate(batches):
                m(batch.to(device), use_cache=False)  # no cache: a model without attention fails with one
                if progress:
                    progress("calibrate", k + 1, len(batches))

    with _quiet(), torch.no_grad(), fused_experts_export():
        mtq.quantize(model, modelopt_config(p, group), forward_loop)
        calibrate_unrouted_experts(model)
        fuse_shared_inputs(model)
    return model


# ---- MoE experts (Model Optimizer 0.47 with transformers 5.23's fused NemotronHExperts) -----------
#
# transformers 5.23 holds a MoE layer's routed experts as 3-D parameters (``NemotronHExperts``);
# Model Optimizer wraps them as ``_QuantNonGatedFusedExperts``: one weight quantizer per expert, one
# input quantizer shared by all of them. Two defects of 0.47 break AWQ (int4) on it, both fixed
# upstream in NVIDIA/Model-Optimizer commit 1efcd42f5 (pull request 2017, not released in 0.47):
# the exporter's AWQ-only expert resmoothing indexes the experts as a list ("object of type
# 'QuantNemotronHExperts' has no len()"), and an expert no calibration token was routed to gets a
# scalar amax at export, which a block format cannot use ("IndexError: too many indices").


def _is_fused_experts(module) -> bool:
    """A Model Optimizer fused-experts wrapper: per-expert weight quantizers on 3-D parameters."""
    return hasattr(module, f"{getattr(module, '_first_proj_attr', 'gate_up_proj')}_weight_quantizers")


@contextmanager
def fused_experts_export():
    """Skip Model Optimizer's AWQ resmoothing of fused MoE experts while inside (what its fix does).

    The step averages the experts' separate input smoothing (``pre_quant_scale``) so they can share
    one; fused experts already share one input quantizer and AWQ gives them no smoothing, so there
    is nothing to average. A Model Optimizer that has the fix (``_has_fused_experts``) is left alone.
    """
    hf_export = _import("modelopt.torch.export.unified_export_hf")
    if hasattr(hf_export, "_has_fused_experts"):
        yield
        return
    original = hf_export.get_experts_list

    def get_experts_list(module, model_type):
        return [] if _is_fused_experts(getattr(module, "experts", None)) else original(module, model_type)

    hf_export.get_experts_list = get_experts_list
    try:
        yield
    finally:
        hf_export.get_experts_list = original


def calibrate_unrouted_experts(model) -> int:
    """Calibrate the weight quantizer of every routed expert that no calibration token reached
    (AWQ calibrates an expert's weight only when a token is routed to it) on that expert's weight,
    with the quantizer's own max calibrator: the amax, per tensor, channel or block as the format
    says, that a routed expert's weight gets. Returns how many quantizers it calibrated.

    The simulated model quantizes such an expert's weight with the same amax (it takes the max of
    the weight when none is stored), so the export and the simulation agree.
    """
    import torch

    done = 0
    for module in model.modules():
        if not _is_fused_experts(module):
            continue
        for weight, q in module.iter_weights_for_calibration():
            amax = getattr(q, "_amax", None)
            if not q.is_enabled or getattr(q, "_calibrator", None) is None or \
                    (amax is not None and bool(torch.any(amax != 0))):
                continue
            q.disable_quant()
            q.enable_calib()
            q(weight)
            q.load_calib_amax()
            q.enable_quant()
            q.disable_calib()
            done += 1
    return done


def quantize_slice(source: str | Path, out: str | Path, precision: str | Precision, *, dtype: str | None = None,
                   force: bool = False, samples: int = CALIBRATION_SAMPLES, seq_len: int = CALIBRATION_LEN,
                   device: str | None = None, progress: Progress | None = None) -> QuantizeResult:
    """Quantize the float slice (or any float nemotron_h checkpoint) at ``source`` into ``out``.

    Args:
        source: a float checkpoint directory (a slice elastic wrote, any of the three config forms).
        out: output directory; must not exist unless ``force`` (then only one elastic wrote).
        precision: fp8, int8 (SmoothQuant W8A8), int8_wo, int4 (AWQ), nvfp4, any spelling.
        dtype: the dtype of the tensors left unquantized (embeddings, norms, LM head, conv1d, Mamba
            parameters); default: bfloat16 (:data:`REST_DEFAULT`, what the plan counts).
        samples, seq_len: calibration windows of train-split text.
        device: where calibration runs (default: CUDA when present, else the CPU).
        progress: ``progress(stage, done, total)``: "load", "calibrate", "export", "write".

    Raises:
        ConfigError: unknown precision or dtype; a model the format cannot hold.
        MissingDependencyError: Model Optimizer is not installed.
        ElasticError: a bad source or output (nothing is written then).
    """
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    p = quantized_precision(precision)
    require_modelopt()
    device = require_device(p, device)
    ckpt = Checkpoint.open(source, require_weights=True)
    _refuse_quantized(ckpt)
    rest = _rest_dtype(dtype, ckpt.dtype)
    weight_group(ckpt.arch.tensor_shapes(), p)  # a model the format cannot hold is refused before any work
    with ShardedWriter(out, force=force, sources=[ckpt.root, *ckpt.weight_files], kind="slice") as w:
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.padded-", dir=Path(out).parent))
        try:
            src, padding = _int4_padded(p, ckpt.root, tmp, rest)
            manifest = _quantize_into(w, src, p, rest, samples, seq_len, device, progress,
                                      {**_manifest_of(ckpt.root), **padding}, {"path": str(ckpt.root.resolve())})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeResult(Path(out), p.name, w.bytes_written, _weights_bytes(Path(out), w.shards), manifest)


def slice_and_quantize(source, out: str | Path, precision: str | Precision, *, budget: str | None = None,
                       spec=None, dtype: str | None = None, force: bool = False,
                       samples: int = CALIBRATION_SAMPLES, seq_len: int = CALIBRATION_LEN,
                       device: str | None = None, progress: Progress | None = None,
                       resolved=None, form: str = "auto", pad_multiple: int | None = None,
                       runtime: str | None = None) -> QuantizeResult:
    """Slice ``source`` (a budget or a spec, as ``slice_checkpoint``) in float32 into a temporary
    directory beside ``out``, then quantize it into ``out`` (see :func:`quantize_slice`).

    The output is checked (and locked) before any work; the float slice is removed in every case.
    ``dtype`` (the unquantized tensors) defaults to bfloat16 (:data:`REST_DEFAULT`). ``form``,
    ``pad_multiple`` and ``runtime`` choose the form of the float slice, padding included
    (``slice_checkpoint``): the quantized model is the padded one.
    """
    from elastic.slicer.formats.padding import portable_form
    from elastic.slicer.slice import choose_spec, slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    p = quantized_precision(precision)
    require_modelopt()
    device = require_device(p, device)
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source, require_weights=True)
    _refuse_quantized(ckpt)
    rest = _rest_dtype(dtype, ckpt.dtype)
    resolved = resolved or choose_spec(ckpt, budget, spec)
    written = portable_form(resolved[0].child_arch(ckpt.arch), form, pad_multiple, runtime).arch  # padded if asked
    weight_group(written.tensor_shapes(), p)  # a model the format cannot hold: refused here
    out = Path(out)
    sources = [ckpt.root, *ckpt.weight_files, *([spec] if isinstance(spec, (str, Path)) else [])]
    with ShardedWriter(out, force=force, sources=sources, kind="slice") as w:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.float32-", dir=out.parent))
        try:
            float_slice = slice_checkpoint(ckpt, tmp / "slice", budget=budget, spec=spec, dtype="float32",
                                           progress=progress, resolved=resolved, form=form,
                                           pad_multiple=pad_multiple, runtime=runtime)
            src, padding = _int4_padded(p, float_slice.out, tmp, rest)
            manifest = _quantize_into(w, src, p, rest, samples, seq_len, device, progress,
                                      {**float_slice.manifest, "dtype": rest, **padding},
                                      {"path": None, "note": "sliced in float32 into a temporary directory"})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeResult(out, p.name, w.bytes_written, _weights_bytes(out, w.shards), manifest)


def write_quantized(model, float_dir: str | Path, out: str | Path, precision: str | Precision, *, group: int | None,
                    corpus, dtype: str | None = None, force: bool = False,
                    progress: Progress | None = None) -> QuantizeResult:
    """Export a model :func:`quantize_model` quantized (loaded by :func:`load_hf` from ``float_dir``)
    into ``out``: the last step of :func:`quantize_slice`, for callers that look at the model first.

    Args:
        group: the int4 group size it was quantized with (None for other formats).
        corpus: the calibration text's ``CorpusInfo`` (recorded in the manifest).
        dtype: the unquantized tensors' dtype (Model Optimizer's export dtype); default: bfloat16
            (:data:`REST_DEFAULT`, as for every slice).
    """
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    p = quantized_precision(precision)
    ckpt = Checkpoint.open(float_dir, require_weights=True)
    rest = _rest_dtype(dtype, ckpt.dtype)
    with ShardedWriter(out, force=force, sources=[ckpt.root, *ckpt.weight_files], kind="slice") as w:
        manifest = _export_into(w, model, ckpt.root, p, rest, group, corpus, _manifest_of(ckpt.root),
                                {"path": str(ckpt.root.resolve())}, progress)
    return QuantizeResult(Path(out), p.name, w.bytes_written, _weights_bytes(Path(out), w.shards), manifest)


def read_arch_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from elastic.slicer.formats.arch import Arch

    return Arch.from_file(model_dir).tensor_shapes()


# ---- internals -----------------------------------------------------------------------------------


def _int4_padded(p: Precision, float_dir: Path, tmp: Path, rest: str) -> tuple[Path, dict[str, Any]]:
    """The float checkpoint to quantize: ``float_dir``, or for int4 where the plan pads the hidden size
    (``planning.memory.int4_hidden``: a larger AWQ group, fewer bytes) a zero-padded copy in ``tmp``
    (``quant.hidden_pad``); and the manifest's ``hidden_padding`` entry saying so (empty: none)."""
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.planning.memory import _int4_group, int4_hidden
    from elastic.slicer.quantize.hidden_pad import pad_hidden

    if p.name != "int4":
        return float_dir, {}
    arch = Arch.from_file(float_dir)
    d = int4_hidden(arch, rest)
    if d == arch.hidden_size:
        return float_dir, {}
    pad_hidden(float_dir, tmp / "hidden-padded", d)
    padded = arch.with_layers(arch.layers, d)
    note = {"from": arch.hidden_size, "to": d, "group": _int4_group(padded.tensor_shapes()),
            "group_as_cut": _int4_group(arch.tensor_shapes()),
            "zero_parameters": padded.param_counts()["total"] - arch.param_counts()["total"],
            "why": "int4's AWQ group must divide every quantized input width; the hidden size as cut allows only "
                   "a small group whose float32 scales outweigh the 4-bit savings, so the hidden size is "
                   "zero-padded (exact: zero channels, the hidden RMSNorm weights scaled by sqrt(d / padded))"}
    return tmp / "hidden-padded", {"hidden_padding": note}


def _refuse_quantized(ckpt) -> None:
    if ckpt.quant is not None:
        raise ConfigError(f"already quantized ({ckpt.quant.quant_algo}): slice and quantize its float checkpoint "
                          "instead", path=str(ckpt.root))


# The float dtype of the tensors Model Optimizer leaves unquantized when none is asked for: bfloat16,
# what the plan counts them in (planning.memory.weight_tensors with the plan's base), whatever the source
# stores (the float32 demo once wrote a 50% int4 slice of 273,728 bytes, larger than its bf16 slice).
REST_DEFAULT = "bfloat16"


def _rest_dtype(requested: str | None, stored: str | None) -> str:
    """The canonical float dtype of the unquantized tensors: ``requested`` (``--dtype``), else
    :data:`REST_DEFAULT` (``stored`` is not used: a float32 source still gets bf16 there)."""
    if requested is None or requested.lower() in ("keep", "auto"):
        return REST_DEFAULT
    return lookup(requested, WEIGHTS, "dtype").name


def _manifest_of(root: Path) -> dict[str, Any]:
    try:
        m = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _weights_bytes(out: Path, shards: list[str]) -> int:
    return sum((out / s).stat().st_size for s in shards)


@contextmanager
def _quiet():
    """Model Optimizer prints to stdout and warns at length, transformers logs and draws progress
    bars on the way (deprecations, CPU fallbacks): none of it reaches the user's terminal, where
    elastic reports progress itself (and ``--json`` owns stdout). ``ELASTIC_DEBUG=1`` lets it through."""
    import io
    import warnings
    from contextlib import redirect_stdout

    if debug_enabled():
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    if hf_logging is not None:
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def _import(module: str):
    """Import an optional module quietly; one that is missing or broken is a fix-it error."""
    import importlib

    with _quiet():
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(f"quantizing needs {module} and it does not import ({e}): "
                                         f"{INSTALL}") from None


def _quantize_into(w, float_dir: Path, p: Precision, rest: str, samples: int, seq_len: int, device: str,
                   progress: Progress | None, float_manifest: dict, float_source: dict) -> dict[str, Any]:
    """Load, calibrate and quantize ``float_dir``, then export it into the open writer ``w``.
    Returns the manifest written."""
    from elastic.slicer.formats.tokenizer import load_tokenizer
    from elastic.slicer.quantize.text import calibration_ids

    group = weight_group(read_arch_shapes(float_dir), p)  # refuses a model the format cannot hold
    group = group if p.name == "int4" else None  # nvfp4's 16 is its config's own
    ids, corpus = calibration_ids(load_tokenizer(float_dir), samples, seq_len)
    if progress:
        progress("load", 0, None)
    model = load_hf(float_dir, device)
    quantize_model(model, p, ids, group, progress)
    return _export_into(w, model, float_dir, p, rest, group, corpus, float_manifest, float_source, progress)


def _export_into(w, model, float_dir: Path, p: Precision, rest: str, group: int | None, corpus,
                 float_manifest: dict, float_source: dict, progress: Progress | None) -> dict[str, Any]:
    """Export the quantized ``model`` to a temporary directory beside the output, validate it and
    write it into the open writer ``w``. The model's weights are replaced by the export (Model
    Optimizer packs them in place): it cannot run afterwards."""
    import torch

    from elastic.slicer.storage.reader import Checkpoint

    if progress:
        progress("export", 0, None)
    export = Path(tempfile.mkdtemp(prefix=f".{w.out.name}.modelopt-", dir=w.out.parent))
    try:
        export_hf_checkpoint = _import("modelopt.torch.export").export_hf_checkpoint
        with _quiet(), fused_experts_export():
            export_hf_checkpoint(model, dtype=getattr(torch, rest), export_dir=export)
        config, hf_quant = _output_configs(float_dir, export, rest)
        (export / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (export / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=2, sort_keys=True) + "\n")
        quantized = Checkpoint.open(export, require_weights=True)  # validates the export against our layout
        _check_excludes(quantized)
        _write(w, quantized, float_dir, config, hf_quant, rest, progress)
        manifest = _manifest(quantized, float_dir, float_manifest, float_source, p, rest, group, corpus,
                             config, w)
        w.add_json(MANIFEST_NAME, manifest)
        quantized.close()
        Checkpoint.open(w.tmp).close()  # what is about to be published opens, layout and all
    finally:
        shutil.rmtree(export, ignore_errors=True)
    return manifest


def _output_configs(float_dir: Path, export: Path, rest: str) -> tuple[dict, dict]:
    """config.json (the float slice's, in its own form, plus ``quantization_config``) and
    hf_quant_config.json, with Model Optimizer's exclude names repaired."""
    hf_quant = json.loads((export / HF_QUANT_CONFIG).read_text())
    section = hf_quant["quantization"]
    section["exclude_modules"] = sorted(clean_exclude_name(e) for e in section.get("exclude_modules") or [])
    qc = json.loads((export / "config.json").read_text()).get("quantization_config") or {}
    if "ignore" in qc:
        qc["ignore"] = sorted(clean_exclude_name(e) for e in qc["ignore"])
    config = read_config(float_dir / "config.json")
    config["quantization_config"] = qc
    config["dtype"] = rest
    if "torch_dtype" in config:
        config["torch_dtype"] = rest
    return config, hf_quant


def _check_excludes(ckpt) -> None:
    """Every exclude entry names a Linear of the model (after repair), so a runtime matching it finds
    the module: a stray name would make it load an unquantized layer as quantized."""
    modules = {n.rsplit(".", 1)[0] for n in ckpt.tensors}
    stray = [e for e in ckpt.quant.exclude_modules if "*" not in e and e not in modules]
    if stray:
        raise ElasticError("Model Optimizer's exclude list names modules the checkpoint does not have "
                           "(runtimes would not match them)", problems=stray, path=str(ckpt.root))


def _write(w, ckpt, float_dir: Path, config: dict, hf_quant: dict, rest: str,
           progress: Progress | None) -> None:
    """Write the export's tensors (unquantized ones cast to ``rest``: Model Optimizer's ``dtype``
    reaches only the Linears it quantizes), the configs, tokenizer and remote code into ``w``."""
    from elastic.slicer.formats.precision import lookup
    from elastic.slicer.slice import PASSTHROUGH_FILES
    from elastic.slicer.storage.writer import OutTensor

    code = lookup(rest).safetensors

    def target(name: str, info) -> str:
        return info.dtype if keeps_dtype(name, info.dtype) else code

    def blocks(name: str, dtype: str):
        if dtype == ckpt.tensors[name].dtype:
            return [ckpt.read_bits(name)]
        import torch

        return [ckpt.read(name).to(getattr(torch, lookup(rest).torch))]

    total = sum(math.prod(t.shape) * _size(target(n, t)) for n, t in ckpt.tensors.items())
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress("write", done[0], total)

    tensors = [OutTensor(name, target(name, info), info.shape,
                         lambda name=name, d=target(name, info): blocks(name, d))
               for name, info in ckpt.tensors.items()]
    w.add_json("config.json", config)
    w.add_json(HF_QUANT_CONFIG, hf_quant)
    w.add_files_from(float_dir, PASSTHROUGH_FILES)
    if remote_code.needs_code(config):
        for f in remote_code.FILES:
            w.add_file(f)
    w.write_tensors(tensors, on_bytes=advance)


def _size(code: str) -> int:
    from elastic.slicer.formats.safetensors import DTYPES

    return DTYPES[code][1]


def _manifest(ckpt, float_dir: Path, float_manifest: dict, float_source: dict, p: Precision, rest: str,
              group: int | None, corpus, config: dict, w) -> dict[str, Any]:
    from importlib.metadata import version

    from elastic.slicer.formats.runtimes import llama_cpp_tokenizer, runtime_support
    from elastic.slicer.formats.llama_cpp import gguf_tokenizer_problem
    from elastic.slicer.formats.tokenizer import missing_tokenizer
    from elastic.slicer.slice import _tokenizer_config

    layout: QuantLayout = ckpt.quant
    m = dict(float_manifest)
    if m.get("form"):  # the padding's zeros are quantized weights now (all of them sit in quantized Linears)
        cost = m["form"]["cost"]
        m["form"] = {**m["form"], "cost": {**cost, "bytes": int(cost["parameters"] * (p.bytes + p.scale_bytes))}}
    m.setdefault("format", "elastic-slice")
    m.setdefault("version", 1)
    m.setdefault("parameters", ckpt.arch.param_counts())
    m.setdefault("layer_pattern", ckpt.arch.layer_pattern)
    m.setdefault("homogeneous", ckpt.arch.is_homogeneous())
    m.update({
        "precision": p.name,
        "dtype": rest,  # of the tensors left unquantized
        "quantization": {
            **describe(layout),
            "tool": f"nvidia-modelopt {version('nvidia-modelopt')}",
            "modelopt_config": p.modelopt_config,
            "simulated_by_elastic": SIMULATED[p.name],
            "calibration": corpus.to_json(),
            "float_slice": {**float_source, "shards": float_manifest.get("shards")},
        },
        "shards": [{"file": name, "sha256": w.sha256[name]} for name in w.shards],
        "runtimes": runtime_support(ckpt.arch, config, _tokenizer_config(float_dir),
                                    llama_cpp_tokenizer(float_dir / "tokenizer.json"), quant_group=layout.group_size,
                                    has_tokenizer=missing_tokenizer(float_dir) is None,
                                    gguf_tokenizer=gguf_tokenizer_problem(float_dir)),
    })
    return m
