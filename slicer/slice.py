"""Physical slicing: cut a nested model out of a checkpoint into a dense, standard checkpoint.

Streams tensor by tensor with partial reads of only the kept ranges, writes the output through
:class:`ShardedWriter` (temporary directory, renamed when complete), and never holds more than one
block of one tensor in memory. Cutting out elements copies their bits, so a slice that keeps the
stored dtype runs on numpy alone; torch is imported only to cast to another dtype.

A quantized source (NVIDIA Model Optimizer's unified layout) is sliced without dequantizing: its
packed weights and scales are cut along the same rules at their own resolution
(``elastic.slicer.quant.slicing``), its per-tensor scales copied, its quantization configs carried.

Example:
    >>> result = slice_checkpoint("./Nemotron-Elastic-12B", "./model-6B", budget="6B", dtype="float16")
    >>> result.parameters, result.bytes_written
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.profiles.units import MIB
from elastic.slicer import remote_code
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.storage.writer import OutTensor, ShardedWriter
from elastic.slicer.formats.elastic_format import ElasticConfig, resolve_budget, router_warning
from elastic.slicer.formats.llama_cpp import gguf_tokenizer_problem
from elastic.slicer.formats.tokenizer import missing_tokenizer
from elastic.slicer.errors import CheckpointError, ConfigError
from elastic.slicer.formats.rules import TensorRule, tensor_rules
from elastic.slicer.formats.runtimes import llama_cpp_tokenizer, runtime_support
from elastic.slicer.formats.padding import portable_form
from elastic.slicer.formats.size_curve import Quality, refuse_off_curve, spec_quality
from elastic.slicer.formats.spec import SliceSpec

MANIFEST_NAME = "slice_manifest.json"
# files a runtime needs beside the weights; copied as they are
PASSTHROUGH_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
BLOCK_BYTES = 16 * MIB  # rows read and written at a time (under glibc's 32 MiB mmap cap: buffers get reused)


@dataclass(frozen=True)
class SliceResult:
    out: Path
    parameters: int
    bytes_written: int
    manifest: dict[str, Any]  # slice_manifest.json as written

    def to_json(self) -> dict[str, Any]:
        """`elastic slice --json`: ``out``, ``parameters``, ``bytes_written``, ``budget``, ``dtype``,
        ``layer_pattern``, ``homogeneous``, ``runtimes``, ``warnings``, ``form`` (the form written and
        its padding: ``elastic.slicer.formats.padding.Portable.to_json``), ``trained`` and ``quality``
        (what the checkpoint's size curve measured of it: ``formats.size_curve.Quality.to_json``)."""
        m = self.manifest
        return {"out": str(self.out), "parameters": self.parameters, "bytes_written": self.bytes_written,
                **{k: m[k] for k in ("budget", "dtype", "layer_pattern", "homogeneous", "runtimes", "warnings")},
                "form": m.get("form"), "trained": m.get("trained"), "quality": m.get("quality")}


def parse_dtype(name: str | None) -> str | None:
    """safetensors code for any spelling of a weight precision ("bf16", "float16", ...; see
    ``formats.precision``), None for "keep"."""
    from elastic.slicer.formats.precision import KEEP, WEIGHTS, lookup

    if name is None or name.lower() in ("auto", KEEP):
        return None
    return lookup(name, WEIGHTS, "dtype").safetensors


def choose_spec(ckpt: Checkpoint, budget: str | None, spec: SliceSpec | str | Path | None, *,
                allow_off_curve: bool = False) -> tuple[SliceSpec, str]:
    """The spec to cut: from a budget of an elastic checkpoint, or an explicit spec (file).

    Raises:
        OffCurveSize: a size no budget was trained for that the checkpoint's size-curve record
            measured outside its trained neighbours (``formats.size_curve``), unless ``allow_off_curve``.
    """
    if (budget is None) == (spec is None):
        raise ConfigError("give exactly one of a budget name or a slice spec file")
    if budget is not None:
        ec = ElasticConfig.read(ckpt.root, ckpt.arch)
        chosen, source = resolve_budget(ckpt.root, ec, ckpt.arch, budget)
        if "not trained" in source and not allow_off_curve:
            refuse_off_curve(budget, slice_quality(ckpt, chosen, ec))
        return chosen, source
    if isinstance(spec, SliceSpec):
        bad = spec.problems(ckpt.arch)
        if bad:
            raise ConfigError("invalid slice spec", problems=bad)
        return spec, "spec"
    return SliceSpec.from_file(spec, ckpt.arch), str(spec)


def slice_quality(ckpt: Checkpoint, spec: SliceSpec, ec: ElasticConfig | None = None) -> Quality | None:
    """What the checkpoint's size-curve record says about ``spec`` (``formats.size_curve.judge``);
    None for a checkpoint that is not elastic."""
    if not ckpt.is_elastic:
        return None
    ec = ec or ElasticConfig.read(ckpt.root, ckpt.arch)
    return spec_quality(ckpt.root, ec.router_file, spec.to_json(ckpt.arch), spec.parameters(ckpt.arch))


def _blocks(ckpt: Checkpoint, rule: TensorRule, code: str | None):
    """Yield the kept part of one tensor, a block of rows at a time.

    Kept axis-0 ranges separated by small gaps are read as one contiguous span (the disk reads
    ahead only when reads are sequential), in blocks of at most BLOCK_BYTES; the kept rows and
    the kept ranges of the other axes are then cut out in memory. Blocks are numpy arrays of raw
    element bits (see :meth:`Checkpoint.read_bits`), or torch tensors of dtype ``code`` when
    ``code`` asks for a cast to another dtype.
    """
    import numpy as np

    info = ckpt.tensors[rule.source]
    cast = code is not None and code != info.dtype
    if not info.shape:  # a scalar (a per-tensor quantization scale): copied whole
        t = ckpt.read_bits(rule.source)
        yield _cast(t, info.dtype, code) if cast else t
        return
    step = max(1, BLOCK_BYTES // max(1, info.row_bytes))
    for span_start, span_end, ranges in _spans(rule.axes[0], info.row_bytes):
        for r0 in range(span_start, span_end, step):
            r1 = min(span_end, r0 + step)
            here = [(max(a, r0), min(b, r1)) for a, b in ranges if a < r1 and b > r0]
            if not here:
                continue
            lo, hi = here[0][0], here[-1][1]
            t = ckpt.read_bits(rule.source, (lo, hi))  # (hi - lo, *info.shape[1:])
            if len(here) > 1:  # drop the gap rows read along with the kept ones
                t = np.concatenate([t[a - lo:b - lo] for a, b in here], axis=0)
            t = select(t, rule.axes[1:], info.shape[1:])
            yield _cast(t, info.dtype, code) if cast else t


def _cast(bits, src: str, dst: str):
    """A torch tensor of dtype ``dst`` holding ``bits`` (raw elements of dtype ``src``) cast to it."""
    import numpy as np
    import torch

    to = getattr(torch, DTYPES[dst][0])
    if bits.size == 0:
        return torch.empty(bits.shape, dtype=to)
    raw = torch.from_numpy(np.ascontiguousarray(bits).reshape(-1).view(np.uint8))  # the bytes on disk
    return raw.view(getattr(torch, DTYPES[src][0])).reshape(bits.shape).to(to)


def _spans(ranges, row_bytes: int, max_gap_bytes: int = 4 * MIB):
    """Group kept ranges into read spans: neighbours closer than ``max_gap_bytes`` share one."""
    spans: list[list] = []
    for a, b in ranges:
        if spans and (a - spans[-1][1]) * row_bytes <= max_gap_bytes:
            spans[-1][1] = b
            spans[-1][2].append((a, b))
        else:
            spans.append([a, b, [(a, b)]])
    return spans


def select(t, axes, full_shape):
    """Keep ``axes[k]`` ranges of dimension k+1 of the numpy array ``t`` (dimension 0 is already cut)."""
    import numpy as np

    for k, (ranges, size) in enumerate(zip(axes, full_shape), start=1):
        lead = (slice(None),) * k  # all of dimensions 0..k-1
        if len(ranges) == 1:
            if ranges[0] != (0, size):
                t = t[(*lead, slice(*ranges[0]))]  # a view; copied by the writer
        else:
            t = np.concatenate([t[(*lead, slice(a, b))] for a, b in ranges], axis=k)
    return t


def slice_checkpoint(
    source: str | Path | Checkpoint,
    out: str | Path,
    *,
    budget: str | None = None,
    spec: SliceSpec | str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    resolved: tuple[SliceSpec, str] | None = None,
    form: str = "auto",
    pad_multiple: int | None = None,
    runtime: str | None = None,
    allow_off_curve: bool = False,
) -> SliceResult:
    """Slice ``source`` along a budget (elastic checkpoints) or a spec (any nemotron_h checkpoint).

    Args:
        source: checkpoint directory (or an opened Checkpoint) with weights; float, or quantized in
            Model Optimizer's unified layout (FP8, NVFP4, W8A8_SQ_PER_CHANNEL, W8A16, W4A16_AWQ).
        out: output directory; must not exist unless ``force``.
        budget: a budget name from elastic_config.json.
        spec: a SliceSpec or the path of a spec JSON file.
        dtype: cast every float tensor ("float16", "bf16", ...); default keeps the stored dtype. A
            quantized source's packed weights and scales keep theirs.
        progress: called as ``progress("slice", bytes_done, bytes_total)`` while tensors are written
            (the one progress protocol: stage, done, total or None).
        resolved: the (spec, where it came from) a plan already resolved for ``budget``.
        form: "puzzle" writes the slice as cut (stock config when homogeneous, NVIDIA's Puzzle form
            for per-layer MLP widths, elastic's extension for per-layer Mamba/attention sizes);
            "stock" zero-pads every MLP / MoE width and attention head count to the largest of its
            kind, a stock ``nemotron_h`` any runtime loads (exact: ``elastic.slicer.formats.padding``);
            "auto": stock when ``runtime`` takes one MLP width, else puzzle.
        pad_multiple: round the MLP / MoE widths up to a multiple of this (128: int4 AWQ's group).
        runtime: the runtime the slice is for ("edgellm", "tensorrt-llm", "sglang", "vllm", ...).
        allow_off_curve: slice a size no budget was trained for even where the checkpoint's
            size-curve record measured it outside its trained neighbours (``choose_spec``).

    Raises:
        ConfigError: not elastic, unknown budget, invalid spec or dtype; an untrained size measured
            outside its trained neighbours (``OffCurveSize``); for a quantized source, a
            kept range that cuts through a packed byte or a scale block (NVFP4's 16-element blocks,
            AWQ's groups and row pairs); a form that cannot hold the slice exactly (stock with
            per-layer Mamba sizes; padding a quantized source).
        CheckpointError: broken source, output exists, a read failed mid-run.
        DiskFullError: the slice does not fit on the output's disk (refused before writing when
            the free space says so; else when the disk fills up), with its size and the free space.
        In every failure the output directory is left as it was.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source, require_weights=True)
    if not ckpt.has_weights:
        raise CheckpointError("no weights to slice (config.json only)", path=str(ckpt.root))
    # a plan hands its resolved (spec, source) down with the budget's name: nothing is resolved twice
    chosen, spec_source = resolved if resolved is not None else choose_spec(
        ckpt, budget, spec, allow_off_curve=allow_off_curve)
    code = parse_dtype(dtype)
    rules, port, quant, config, codes, out_dtype = _layout(ckpt, chosen, code, form, pad_multiple, runtime)
    out_tensors, total, advance = _out_tensors(ckpt, rules, port, codes, progress)
    copied = [ckpt.root / f for f in PASSTHROUGH_FILES if (ckpt.root / f).is_file()]
    if remote_code.needs_code(config):
        copied += [Path(f) for f in remote_code.FILES]
    sources = [ckpt.root, *ckpt.weight_files, *([spec] if isinstance(spec, (str, Path)) else [])]
    with ShardedWriter(out, force=force, sources=sources, kind="slice") as w:
        w.expect(total + sum(f.stat().st_size for f in copied))  # the slice's size: refused now if it cannot fit
        _add_files(w, config, quant, copied)
        w.write_tensors(out_tensors, max_shard_bytes, on_bytes=advance)
        manifest = _manifest(ckpt, budget, chosen, spec_source, port.arch, config, w, out_dtype, quant)
        manifest["form"] = port.to_json(DTYPES[code][1] if code else _dtype_bytes(out_dtype))
        w.add_json(MANIFEST_NAME, manifest)
    return SliceResult(Path(out), manifest["parameters"]["total"], w.bytes_written, manifest)


def _layout(ckpt: Checkpoint, chosen: SliceSpec, code: str | None, form: str, pad_multiple: int | None,
            runtime: str | None):
    """The slice's layout: (rules, form, quantized plan or None, config, dtype code per tensor, output dtype)."""
    parent, compact = ckpt.arch, chosen.child_arch(ckpt.arch)
    rules = tensor_rules(parent, chosen)
    assert {r.name: r.shape for r in rules} == compact.tensor_shapes(), "slicing rules disagree with the child layout"
    # the form it is written in: padded to one size per kind where asked (refused before any work)
    port = portable_form(compact, form, pad_multiple, runtime, quantized=ckpt.quant is not None)
    child = port.arch
    assert {r.name: port.shape(r.name, r.shape) for r in rules} == child.tensor_shapes(), "padding disagrees"
    config = child.to_config()
    quant = None
    if ckpt.quant is not None:  # packed weights and scales: cut at their own resolution, never cast
        from elastic.slicer.quant.slicing import plan_quantized

        quant = plan_quantized(ckpt, rules, chosen)  # refuses a cut through a block before anything is written
        rules = list(quant.rules)
        assert _quantized_shapes_agree(quant, compact), "quantized slicing rules disagree with the child layout"
        if quant.quantization_config is not None:
            config["quantization_config"] = quant.quantization_config
    codes = {r.name: None if quant is not None and r.name in quant.stored else code for r in rules}
    out_dtype = DTYPES[code][0] if code else _float_dtype(ckpt)
    config["dtype"] = out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype
    return rules, port, quant, config, codes, out_dtype


def _out_tensors(ckpt: Checkpoint, rules, port, codes: dict, progress: Progress | None):
    """(the tensors to write, their total bytes, the writer's on_bytes callback reporting progress)."""
    shapes = {r.name: port.shape(r.name, r.shape) for r in rules}
    total = sum(math.prod(shapes[r.name]) * DTYPES[codes[r.name] or ckpt.tensors[r.source].dtype][1] for r in rules)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress("slice", done[0], total)

    out_tensors = [
        OutTensor(r.name, codes[r.name] or ckpt.tensors[r.source].dtype, shapes[r.name],
                  lambda r=r: port.blocks(r.name, _blocks(ckpt, r, codes[r.name]), r.shape))
        for r in rules
    ]
    return out_tensors, total, advance


def _add_files(w: ShardedWriter, config: dict, quant, copied: list[Path]) -> None:
    """config.json, a quantized slice's hf_quant_config.json, and the files copied from the source."""
    w.add_json("config.json", config)
    if quant is not None and quant.hf_quant_config is not None:
        from elastic.slicer.quant.layout import HF_QUANT_CONFIG

        w.add_json(HF_QUANT_CONFIG, quant.hf_quant_config)
    for f in copied:
        w.add_file(f)


def _dtype_bytes(name: str | None) -> int:
    """Bytes of one element of the float dtype ``name`` ("float16"); 4 when unknown."""
    return next((size for n, size in DTYPES.values() if n == name), 4)


def _float_dtype(ckpt: Checkpoint) -> str | None:
    """The dtype the model computes in: as stored, or for a quantized checkpoint the dtype of its
    unquantized tensors (its embeddings'), as ``load_model`` runs it."""
    if ckpt.quant is None:
        return ckpt.dtype
    return ckpt.tensors["backbone.embeddings.weight"].dtype_name


def _quantized_shapes_agree(quant, child) -> bool:
    """Internal check: the quantized rules give exactly the tensors the child's layout implies
    (optional ones, such as AWQ's folded pre_quant_scale, where the source has them)."""
    from elastic.slicer.quant.layout import OPTIONAL, expected_tensors

    have = {r.name: r.shape for r in quant.rules}
    expected, problems = expected_tensors(quant.layout, child.tensor_shapes())
    want = {n: shape for n, (_, shape) in expected.items() if n in have or n.rsplit(".", 1)[-1] not in OPTIONAL}
    return not problems and have == want


def _tokenizer_config(root: Path) -> dict | None:
    """The source's tokenizer_config.json (copied into the slice as it is), None when absent or unreadable."""
    try:
        data = json.loads((root / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _warnings(ckpt: Checkpoint, budget: str | None, spec_source: str, child, quality: Quality | None) -> list[str]:
    """What the user should know about a slice that was written: no tokenizer; no attention layer
    left (llama.cpp and transformers' generate cannot run it); a size no budget was trained for (and
    what the size-curve record measured of it); a router that router.file names but that is not
    there (the budget came from elastic_config.json's choices)."""
    notes = [missing_tokenizer(ckpt.root)]
    if any(layer.kind == "attention" for layer in ckpt.arch.layers) and \
            not any(layer.kind == "attention" for layer in child.layers):
        notes.append("this slice keeps no attention layer: llama.cpp cannot run it (it aborts in its KV cache) and "
                     "transformers 5.23's generate() fails on it; keep one attention layer to run it there")
    if budget is not None and "not trained" in spec_source:
        notes.append(_untrained_note(budget, spec_source.split("not trained: ", 1)[1], quality))
    elif quality is not None and quality.verdict == "outside":  # a spec file cut to an off-curve size
        notes.append(f"this architecture was measured as {', '.join(quality.measured_as)}: {quality.words()}")
    if budget is not None and spec_source == "elastic_config.json":
        notes.append(router_warning(ckpt.root, ElasticConfig.read(ckpt.root, ckpt.arch)))
    return [n for n in notes if n]


def _untrained_note(budget: str, where: str, quality: Quality | None) -> str:
    """The note on a size no budget was trained for: where it sits, and what was measured of it."""
    head = f"{budget} is not a trained budget ({where})"
    if quality is None or quality.verdict == "not measured":
        why = quality.note if quality is not None and quality.note else "compare it with the trained budgets with " \
            "`elastic eval`"
        return f"{head}: its quality is not measured ({why})"
    if quality.verdict == "interpolated":
        return f"{head}: its quality is {quality.words()}"
    if quality.verdict == "outside":
        return f"{head} and was sliced although it is off the measured curve: {quality.words()}"
    return f"{head}: {quality.words()}"


def _manifest(ckpt, budget, spec, spec_source, child, config, writer, dtype, quant) -> dict[str, Any]:
    cfg_bytes = (ckpt.root / "config.json").read_bytes()
    quality = slice_quality(ckpt, spec)
    extra: dict[str, Any] = {}
    if quant is not None:  # the source was quantized; the slice was cut without dequantizing
        from elastic.slicer.quant.slicing import describe_slice

        extra = {"precision": quant.layout.format.precision, "quantization": describe_slice(quant.layout)}
    return {
        "format": "elastic-slice",
        "version": 1,
        "source": {
            "path": str(ckpt.root.resolve()),
            "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
            "elastic": ckpt.is_elastic,
            "parameters": ckpt.arch.param_counts()["total"],
            "quantized": ckpt.quant is not None,
        },
        "budget": budget,
        "spec_source": spec_source,
        "trained": budget is None or "not trained" not in spec_source,
        # held-out perplexity from the checkpoint's size-curve record (formats.size_curve), or "not measured"
        "quality": quality.to_json() if quality is not None else None,
        "spec": spec.to_json(ckpt.arch),
        "parameters": child.param_counts(),
        "layer_pattern": child.layer_pattern,
        "homogeneous": child.is_homogeneous(),
        "dtype": dtype,  # of the tensors left unquantized, for a quantized slice
        "shards": [{"file": name, "sha256": writer.sha256[name]} for name in writer.shards],
        "runtimes": runtime_support(child, config, _tokenizer_config(ckpt.root),
                                    llama_cpp_tokenizer(ckpt.root / "tokenizer.json"),
                                    quant_group=quant.layout.group_size if quant is not None else None,
                                    has_tokenizer=missing_tokenizer(ckpt.root) is None,
                                    gguf_tokenizer=gguf_tokenizer_problem(ckpt.root)),
        "warnings": _warnings(ckpt, budget, spec_source, child, quality),
        **extra,
    }
