"""A TensorRT Edge-LLM bundle: a slice in the form and precision Edge-LLM takes on a Jetson, run
through Edge-LLM's own exporter, with the commands that build and run its engine on the device.

Edge-LLM (NVIDIA's engine for Jetson Orin and Thor, ``tensorrt-edgellm`` on PyPI) exports a
Hugging Face checkpoint to its own ONNX with its attention / Mamba / MoE plugins
(``tensorrt-edgellm-export HF_DIR OUT`` writes ``OUT/llm/{model.onnx, model.onnx.data, config.json,
embedding.safetensors, tokenizer files, chat_template.jinja}``); the engine is built on the device
(``llm_build``) and run by its C++ runtime (``llm_inference``). What its ``nemotron_h`` takes
(checked with 0.11.0 on CPU, DESIGN.md section 10): one global size per layer kind (a Puzzle-form
slice is padded to one MLP width, ``elastic.slicer.formats.padding``), float16 weights (float32 fails:
"FP16Linear expects float16 input"), a chat template, MoE layers only as NVFP4 experts, INT4 only as
AWQ with group 128 and, in its default GEMM plugin, every quantized Linear 64-aligned.

Its package pins transformers 5.14.1 while elastic uses 5.23, so it lives in a virtual environment
of its own and runs as a command (:func:`find_exporter`), never imported.

Example:
    >>> r = export_edgellm("./model-50", "./model-50-edgellm", target="orin-nx-16gb")
    >>> r.manifest["precision"], r.manifest["form"]["padding"]
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.errors import ProfileError
from elastic.profiles.progress import Progress
from elastic.slicer.errors import ConfigError, ElasticError, Hint, MissingDependencyError
# Edge-LLM's INT4: AWQ groups of 128 along the input, Linears 64-aligned (its default GEMM plugin); decided
# once, where the plan reads them too
from elastic.slicer.planning.engines import EDGELLM_INT4_ALIGN as INT4_ALIGN
from elastic.slicer.planning.memory import DEFAULT_EXPORT_CONTEXT
from elastic.slicer.planning.engines import EDGELLM_INT4_GROUP as INT4_GROUP

from .edgellm_readme import INPUT, LOG, render
from .layout import CHECKSUMS, MANIFEST, README, checksums

EDGELLM_VERSION = "0.11.0"  # the exporter this module was checked with
EXPORTER = "tensorrt-edgellm-export"
EXPORTER_ENV = "ELASTIC_EDGELLM_EXPORT"  # a command (split like a shell) that runs the exporter
VENV = ".venv-edgellm"  # the exporter's own virtual environment, beside the repository or the working directory
INSTALL = (f"python3 -m venv {VENV} && {VENV}/bin/pip install torch==2.13.0 "
           f"'tensorrt-edgellm[export]=={EDGELLM_VERSION}'")
ENGINE_RUNTIME = "TensorRT Edge-LLM"  # its name in the device tables' runtimes
# Jetson platforms Edge-LLM builds for, by compute capability: its CMake EMBEDDED_TARGET, the CUDA
# toolkit of JetPack 7.2 (docs/source/user_guide/getting_started/installation.md, "JetPack 7.2 Orin/Thor")
PLATFORMS = {"8.7": ("jetson-orin", 87, "13.2"), "11.0": ("jetson-thor", 110, "13.2")}
# written as chat_template.jinja when the model has none: Edge-LLM's runtime renders it with Pantor
# Inja, so only plain loops, conditions and dotted names
DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class EdgeDevice:
    """A Jetson Edge-LLM builds engines for, from its device profile."""

    profile: str  # the --target name
    display_name: str
    platform: str  # Edge-LLM's EMBEDDED_TARGET: "jetson-orin" | "jetson-thor"
    sm: int  # 87 | 110
    cuda: str  # CUDA_CTK_VERSION of JetPack 7.2
    precisions: tuple[str, ...]  # what Edge-LLM runs there: "fp16" and the quantized short names


@dataclass(frozen=True)
class EdgeLLMResult:
    out: Path
    manifest: dict[str, Any]  # export_manifest.json as written

    def to_json(self) -> dict[str, Any]:
        """The manifest, and ``out``: where the bundle is."""
        return {**self.manifest, "out": str(self.out)}


def find_exporter() -> list[str]:
    """The command that runs Edge-LLM's exporter: ``$ELASTIC_EDGELLM_EXPORT``, else
    ``tensorrt-edgellm-export`` on PATH, else ``.venv-edgellm/bin/`` beside the repository or in
    the working directory.

    Raises:
        MissingDependencyError: none of them, with the commands that install it.
    """
    env = os.environ.get(EXPORTER_ENV, "").strip()
    if env:
        cmd = shlex.split(env)
        if shutil.which(cmd[0]) is None:
            raise MissingDependencyError(f"{EXPORTER_ENV} is {env!r}, but {cmd[0]!r} is not a command here; point it "
                                         f"at {EXPORTER} (or unset it: {VENV}/bin/ beside the repository is found "
                                         f"too). To install it: {INSTALL}")
        return cmd
    found = shutil.which(EXPORTER)
    if found:
        return [found]
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / VENV / "bin" / EXPORTER
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    raise MissingDependencyError(
        f"TensorRT Edge-LLM's exporter ({EXPORTER}) is not installed. It pins transformers 5.14.1 (elastic uses "
        f"5.23), so install it in a virtual environment of its own, beside the repository: {INSTALL} (the CPU "
        f"build of torch first, so pip keeps it). Or set {EXPORTER_ENV} to the command that runs it")


def edgellm_device(target) -> EdgeDevice:
    """The Jetson a bundle is for: ``target`` is a profile name, a ``DeviceProfile`` (the front end's
    detected one: nothing here detects), or None (no device known: refused).

    Raises:
        ProfileError: an unknown profile, no device, or a device Edge-LLM does not build engines for.
    """
    from elastic.profiles.devices import get_profile

    if isinstance(target, str) and target:
        profile = get_profile(target)
    else:
        profile = target or None
        if profile is None or profile.kind != "jetson":
            raise ProfileError("TensorRT Edge-LLM builds its engine on the Jetson it runs on, and this machine is not "
                               "a Jetson elastic knows: name the device the bundle is for",
                               hint=Hint("target", "name a Jetson Orin or Thor profile (see `elastic profiles`)"))
    platform = PLATFORMS.get(profile.compute_capability or "") if profile.kind == "jetson" else None
    if platform is None:
        cc = f"compute capability {profile.compute_capability}" if profile.compute_capability else "no GPU"
        raise ProfileError(
            f"TensorRT Edge-LLM does not run on {profile.display_name} ({profile.kind}, {cc}): it builds engines for "
            "Jetson Orin (sm_87) and Jetson Thor (sm_110). For this device export a GGUF for llama.cpp (format gguf), "
            "or serve the slice's Hugging Face directory with vLLM or TensorRT-LLM",
            hint=Hint("target", "name a Jetson Orin or Thor profile (see `elastic profiles`)"))
    quantized = tuple(p for p, runtimes in profile.runtimes.items() if ENGINE_RUNTIME in runtimes)
    return EdgeDevice(profile.name, profile.display_name, platform[0], platform[1], platform[2],
                      ("fp16", *quantized))


def _precision(requested: str | None, device: EdgeDevice, source_quant: str | None) -> str:
    """The short name of the precision to export in: "fp16" or a quantized one the device runs."""
    from elastic.slicer.formats.precision import ALL, AUTO, lookup

    name = (source_quant or "fp16") if requested in (None, AUTO) else lookup(requested, ALL).short
    if name in ("fp32", "bf16"):
        raise ConfigError(f"TensorRT Edge-LLM computes its float layers in fp16 (its FP16Linear; float32 weights fail "
                          f"with 'FP16Linear expects float16 input'), so the bundle is fp16, not {name}",
                          hint=Hint("precision", "ask for fp16 (or auto)", "fp16"))
    if name not in device.precisions:
        raise ConfigError(f"TensorRT Edge-LLM runs {', '.join(device.precisions)} on {device.display_name}, not "
                          f"{name}", hint=Hint("precision", f"choose one of {', '.join(device.precisions)}"))
    if source_quant is not None and name != source_quant:
        raise ConfigError(f"the model is already quantized in {source_quant}; it is exported as it is, not "
                          f"re-quantized to {name}: export its float source instead",
                          hint=Hint("precision", "keep the model's own precision", "auto"))
    return name


def preflight(ckpt, device: EdgeDevice, precision: str) -> Any:
    """What Edge-LLM cannot take, refused before any work (the exporter is not even looked for).
    Returns the :class:`~elastic.slicer.formats.padding.Portable` form the model is exported in.

    Raises:
        ConfigError: MoE below NVFP4, per-layer Mamba sizes, a quantized model that would need
            padding, int4 widths Edge-LLM cannot take, no tokenizer.
    """
    from elastic.slicer.formats.padding import portable_form
    from elastic.slicer.formats.tokenizer import missing_tokenizer

    arch = ckpt.arch
    moe = [i for i, layer in enumerate(arch.layers) if layer.kind == "moe"]
    if moe and precision != "nvfp4":
        where = ("ask for nvfp4: Jetson Thor runs NVFP4, and Model Optimizer quantizes the model to it"
                 if "nvfp4" in device.precisions else
                 f"{device.display_name} has no NVFP4: run this MoE slice with llama.cpp (format gguf) instead")
        raise ConfigError(f"layers {moe} are MoE layers: TensorRT Edge-LLM runs Nemotron-H MoE experts only as NVFP4 "
                          f"(its MoE layer is an NVFP4 plugin; {precision} fails: 'NVFP4 MoE experts must use NVFP4 "
                          f"quant'); {where}",
                          hint=Hint("precision", "ask for nvfp4", "nvfp4") if "nvfp4" in device.precisions else
                          Hint("target", "name a Jetson Thor, which runs NVFP4", "thor-128gb"))
    try:
        port = portable_form(arch, "stock", INT4_GROUP if precision == "int4" else None, "edgellm",
                             quantized=ckpt.quant is not None)
    except ConfigError as e:
        raise ConfigError(f"TensorRT Edge-LLM takes one size per layer kind (its nemotron_h reads one global "
                          f"intermediate_size and one Mamba config): {e.message}", problems=e.problems,
                          path=str(ckpt.root), hint=e.hint) from None
    if precision == "int4":
        _int4_check(port.arch)
    elif precision != "fp16" and ckpt.quant is None:  # Model Optimizer's own limits, before it runs
        _quantizable(port.arch, precision, bool(moe))
    problem = missing_tokenizer(ckpt.root)
    if problem:
        raise ConfigError(f"TensorRT Edge-LLM's runtime tokenizes text itself and its exporter copies the tokenizer: "
                          f"{problem}", path=str(ckpt.root))
    return port


def _quantizable(arch, precision: str, moe: bool) -> None:
    """Model Optimizer can write ``arch`` in ``precision`` (NVFP4's blocks of 16 along the input)."""
    from elastic.slicer.formats.precision import lookup
    from elastic.slicer.quant.layout import weight_group

    try:
        weight_group(arch.tensor_shapes(), lookup(precision))
    except ConfigError as e:
        other = ("TensorRT Edge-LLM runs MoE layers in nvfp4 only: run this slice with llama.cpp (format gguf), "
                 "or slice a hidden size that is a multiple of 16") if moe else None
        raise ConfigError(e.message, problems=e.problems[:12], path=str(arch.config_path or "") or None,
                          hint=Hint("precision", "choose fp16") if not moe else
                          Hint("spec", other)) from None


def _int4_check(arch) -> None:
    """Edge-LLM's INT4 (AWQ, group 128; default GEMM plugin 64-aligned) can hold ``arch``'s Linears."""
    from elastic.slicer.quant.layout import quantized_widths

    bad = [f"{m}: {out} x {inp}" for m, (out, inp) in quantized_widths(arch.tensor_shapes()).items()
           if inp % INT4_GROUP or out % INT4_ALIGN]
    if bad:
        raise ConfigError(
            f"TensorRT Edge-LLM's INT4 is AWQ with groups of {INT4_GROUP} along the input and its INT4 GEMM plugin needs "
            f"output rows in multiples of {INT4_ALIGN}: these Linears (out x in) do not fit, and only MLP widths can be "
            "padded "
            "(NVIDIA's own Nemotron Nano 9B v2 has no Edge-LLM INT4 for the same reason)", problems=bad[:12],
            hint=Hint("precision", "choose fp16, or int8 / fp8 where the device runs them"))


def export_edgellm(model_dir: str | Path, out: str | Path, *, target=None, precision: str = "auto",
                   max_batch: int = 1, max_context: int = DEFAULT_EXPORT_CONTEXT, chat_template: str | Path | None = None,
                   prompt: str = "Hello", force: bool = False,
                   progress: Progress | None = None) -> EdgeLLMResult:
    """Write a TensorRT Edge-LLM bundle of ``model_dir`` for the Jetson ``target``.

    Args:
        model_dir: a model directory (an ``elastic slice`` output: any form, float or quantized).
        out: the bundle directory; must not exist unless ``force``.
        target: a Jetson Orin / Thor profile name, or its ``DeviceProfile`` (``elastic export`` passes this
            machine's when it is one).
        precision: "auto" (fp16, or the model's own quantized format), fp16, or int4 / int8 / fp8 /
            nvfp4 where Edge-LLM runs it on the device (quantized with Model Optimizer from a float model).
        max_batch, max_context: the engine's limits, written into the build command.
        chat_template: a Jinja file to use when the model has no chat template (default: a plain
            "role: content" template, said in the manifest's warnings).
        prompt: the request in the bundle's ``input.json``.
        progress: ``progress(stage, done, total, **detail)`` (``elastic.profiles.progress``): "slice"
            (bytes), the quantizer's stages, "edgellm export".

    Returns:
        the bundle's manifest: device, precision, form and padding, chat template, Edge-LLM's
        config widths, files, and the commands that build and run the engine.

    Raises:
        ProfileError: a device Edge-LLM does not support. ConfigError: a model it cannot take (MoE
        below NVFP4, per-layer Mamba sizes, int4 widths, no tokenizer). MissingDependencyError: the
        exporter (or, to quantize, Model Optimizer) is not installed. ElasticError: the exporter
        failed (its last lines quoted). Nothing is written under ``out`` in any of these cases.
    """
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    device = edgellm_device(target)
    ckpt = Checkpoint.open(model_dir, require_weights=True)
    source_quant = ckpt.quant.format.precision if ckpt.quant is not None else None
    p = _precision(precision, device, source_quant)
    port = preflight(ckpt, device, p)
    template = Path(chat_template).read_text() if chat_template else None
    exporter = find_exporter()
    if p != "fp16" and source_quant is None:
        from elastic.slicer.quantize.workflow import require_modelopt

        require_modelopt()
    # the files read may share a directory with the bundle (fit-my-gpu writes it to MODEL_DIR/edgellm)
    read = [p for p in ckpt.root.iterdir() if p.is_file()]
    with ShardedWriter(out, force=force, source_files=[*read, *ckpt.weight_files], kind="export") as w:
        # staged beside the bundle (one filesystem), but never inside the model being read
        beside = Path(out).resolve().parent
        beside = ckpt.root.resolve().parent if ckpt.root.resolve() in (beside, *beside.parents) else beside
        staging = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.edgellm-", dir=beside))
        try:
            sliced = _stage(ckpt, staging / "model", p, source_quant, progress)
            template_note = _chat_template(staging / "model", template, chat_template)
            llm = _run_exporter(exporter, staging / "model", w.tmp, device, p, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        manifest = {"out": str(out), **_manifest(ckpt, device, p, port, sliced, template_note, llm, exporter,
                                                  max_batch, max_context)}
        (w.tmp / INPUT).write_text(json.dumps(input_request(prompt), indent=2) + "\n")
        w.add_text(README, render(manifest))
        manifest["files"] = sorted(str(f.relative_to(w.tmp)) for f in w.tmp.rglob("*") if f.is_file()) + [
            MANIFEST, CHECKSUMS]
        w.add_json(MANIFEST, manifest)
        w.add_text(CHECKSUMS, checksums(w.tmp))
    return EdgeLLMResult(Path(out), manifest)


def _stage(ckpt, dest: Path, precision: str, source_quant: str | None, progress) -> dict[str, Any]:
    """The model as Edge-LLM takes it, in ``dest``: the whole model (nothing cut) in the stock form,
    fp16, quantized when asked. Returns the slice's manifest."""
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.slicer.slice import slice_checkpoint

    full = SliceSpec.full(ckpt.arch)
    shape = {"form": "stock", "runtime": "edgellm", "pad_multiple": INT4_GROUP if precision == "int4" else None}
    if precision == "fp16" or source_quant is not None:  # a quantized model keeps its packed weights
        return slice_checkpoint(ckpt, dest, spec=full, dtype="float16", progress=progress, **shape).manifest
    from elastic.slicer.quantize.workflow import slice_and_quantize

    return slice_and_quantize(ckpt, dest, precision, spec=full, dtype="float16", progress=progress, **shape).manifest


def _chat_template(model: Path, template: str | None, given: str | Path | None) -> dict[str, Any]:
    """Make sure ``model`` has a chat template (Edge-LLM refuses a model without one). Returns where
    the bundle's template came from."""
    try:
        tok = json.loads((model / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tok = {}
    if (model / "chat_template.jinja").is_file() or tok.get("chat_template"):
        return {"source": "model"}
    (model / "chat_template.jinja").write_text(template or DEFAULT_CHAT_TEMPLATE)
    if given:
        return {"source": str(given)}
    return {"source": "elastic", "template": DEFAULT_CHAT_TEMPLATE,
            "note": "the model has no chat template and Edge-LLM needs one: elastic added a plain 'role: content' "
                    "template, which the model was not trained on; give the parent model's template for chat use"}


def _run_exporter(exporter: list[str], model: Path, out: Path, device: EdgeDevice, precision: str,
                  progress) -> dict[str, Any]:
    """Run Edge-LLM's exporter on ``model`` into ``out`` (it writes ``out/llm``); its output goes to
    ``out/edgellm_export.log``. Returns the config.json it wrote."""
    cmd = [*exporter, str(model), str(out)]
    if precision == "nvfp4" and device.sm == 110:  # Thor's NVFP4 plugins (the flag names the target SM)
        cmd += ["--target-sm", str(device.sm)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # its own venv only
    if progress:
        progress("edgellm export", 0, None)
    with open(out / LOG, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        except OSError as e:
            raise MissingDependencyError(f"cannot run {cmd[0]} ({e.strerror}); {INSTALL}") from None
    if progress:
        progress("edgellm export", 1, None)
    config = out / "llm" / "config.json"
    if rc != 0 or not config.is_file():
        tail = [line for line in (out / LOG).read_text(errors="replace").splitlines() if line.strip()][-8:]
        reason = next((line.strip() for line in reversed(tail) if "Error" in line), tail[-1] if tail else "")
        raise ElasticError(f"TensorRT Edge-LLM's exporter failed (exit {rc}): {reason}", problems=tail)
    return json.loads(config.read_text())


def llm_widths(llm: dict[str, Any]) -> dict[str, Any]:
    """The sizes Edge-LLM's config.json gives the engine (what its runtime allocates from)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_attention_layers", "num_linear_attn_layers", "recurrent_state_num_heads",
            "recurrent_state_head_dim", "recurrent_state_size", "recurrent_state_num_groups", "conv_dim",
            "vocab_size", "moe_intermediate_size", "num_experts", "n_routed_experts")
    return {k: llm[k] for k in keys if k in llm}


def expected_widths(arch) -> dict[str, Any]:
    """The same sizes, from the architecture of the model that was exported."""
    kinds = [layer.kind for layer in arch.layers]
    first = {k: next((x for x in arch.layers if x.kind == k), None) for k in ("mamba", "attention", "mlp")}
    out: dict[str, Any] = {"hidden_size": arch.hidden_size, "num_hidden_layers": len(kinds),
                           "vocab_size": arch.vocab_size, "num_attention_layers": kinds.count("attention"),
                           "num_linear_attn_layers": kinds.count("mamba")}
    if first["mlp"]:
        out["intermediate_size"] = first["mlp"].intermediate_size
    if first["mamba"]:
        m = first["mamba"]
        out.update(recurrent_state_num_heads=m.mamba_num_heads, recurrent_state_head_dim=m.mamba_head_dim,
                   recurrent_state_size=arch.ssm_state_size, recurrent_state_num_groups=arch.n_groups,
                   conv_dim=m.mamba_intermediate + 2 * arch.n_groups * arch.ssm_state_size)
    if first["attention"]:
        a = first["attention"]
        out.update(num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
                   head_dim=arch.head_dim)
    return out


def _manifest(ckpt, device: EdgeDevice, precision: str, port, sliced: dict, template: dict, llm: dict,
              exporter: list[str], max_batch: int, max_context: int) -> dict[str, Any]:
    """export_manifest.json, less its file list; refuses a bundle whose engine config disagrees with
    the model (a bug: nothing is written)."""
    have, want = llm_widths(llm), expected_widths(port.arch)
    if "intermediate_size" not in want:  # no MLP layer: Edge-LLM's value is its config default, not the model's
        have.pop("intermediate_size", None)
    wrong = [f"{k}: Edge-LLM wrote {have.get(k)}, the model has {v}" for k, v in want.items() if have.get(k) != v]
    if wrong:
        raise ElasticError("TensorRT Edge-LLM's config.json disagrees with the model it exported (nothing was "
                           "written); this is a bug, please report it", problems=wrong)
    warnings = [template["note"]] if template.get("note") else []
    if not any(layer.kind == "attention" for layer in port.arch.layers):
        warnings.append("this model keeps no attention layer: Edge-LLM's exporter takes it (no KV cache), but an "
                        "engine without attention layers was not built here (no Jetson); keep one attention layer "
                        "if llm_build refuses it")
    return {
        "format": "edgellm",
        "model_dir": str(ckpt.root),
        "device": {"profile": device.profile, "name": device.display_name, "platform": device.platform,
                   "sm": device.sm, "cuda": device.cuda, "precisions": list(device.precisions)},
        "precision": precision,
        "form": sliced.get("form"),
        "quantization": sliced.get("quantization"),
        "parameters": port.arch.param_counts()["total"],
        "layer_pattern": port.arch.layer_pattern,
        "chat_template": template,
        "edgellm": {"version": llm.get("edgellm_version"), "exporter": exporter, "config": have},
        "engine": {"max_batch": max_batch, "max_input_len": max_context, "max_kv_cache_capacity": max_context},
        "warnings": warnings,
    }


def input_request(prompt: str, max_new_tokens: int = 64) -> dict[str, Any]:
    """The request ``llm_inference --inputFile`` reads (Edge-LLM's input format: docs/source/
    user_guide/getting_started/quick-start-guide.md)."""
    return {"batch_size": 1, "temperature": 0.0, "max_generate_length": max_new_tokens,
            "requests": [{"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}]}
