"""Slice specs: which prefix of every elastic dimension a nested model keeps. No torch here.

A spec names the kept hidden size and, per parent layer, whether it is kept and its kept sizes
(Mamba heads and head channels, attention heads, FFN width, MoE routed experts, expert and shared
expert widths). Sizes left out keep the parent's. On disk (``--spec spec.json`` and the resolved
choices in ``elastic_config.json``):

    {"hidden_size": 48,
     "layers": [{"index": 0, "mamba_num_heads": 4, "mamba_head_dim": 12},
                {"index": 1, "intermediate_size": 128},
                {"index": 2, "n_routed_experts": 64, "moe_intermediate_size": 1024},
                {"index": 3, "keep": false}]}

or one flat object in the terms of NVIDIA's Model Optimizer / Megatron-LM elastic code, one size
for every layer of a kind (:data:`NVIDIA_KEYS`):

    {"hidden_size": 2304, "mamba_num_heads": 56, "num_moe_experts": 96, "moe_ffn_hidden_size": 1536,
     "num_layers": 50}

Example:
    >>> spec = SliceSpec.from_json(json.load(open("spec.json")), parent_arch)
    >>> child = spec.child_arch(parent_arch)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.errors import CheckpointError, ConfigError
from elastic.slicer.formats.values import is_int

# per-layer spec fields by kind: what may be trimmed (KV heads, B/C, G, N, top-k and the MoE latent
# width are never elastic)
SPEC_FIELDS = {
    "mamba": ("mamba_num_heads", "mamba_head_dim"),
    "attention": ("num_attention_heads",),
    "mlp": ("intermediate_size",),
    "moe": ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size"),
}
NATIVE_KEYS = ("hidden_size", "layers", "name", "budget")
# NVIDIA's vocabulary (Model Optimizer's Minitron ``export_config``, Megatron-LM's elastic configs):
# key -> (layer kind, our per-layer field); every layer of that kind gets the one value.
# ``num_layers``: how many layers stay, the rest dropped in the checkpoint's depth order.
NVIDIA_KEYS = {
    "hidden_size": (None, "hidden_size"),
    "mamba_num_heads": ("mamba", "mamba_num_heads"),
    "mamba_head_dim": ("mamba", "mamba_head_dim"),
    "num_attention_heads": ("attention", "num_attention_heads"),
    "ffn_hidden_size": ("mlp", "intermediate_size"),
    "num_moe_experts": ("moe", "n_routed_experts"),
    "moe_ffn_hidden_size": ("moe", "moe_intermediate_size"),
    "moe_shared_expert_intermediate_size": ("moe", "moe_shared_expert_intermediate_size"),
    "num_layers": (None, "num_layers"),
}
DEPTH_FILE = "importance.safetensors"  # its metadata "depth_order": [[layer, score], ...], least important first


def is_nvidia_form(data: dict) -> bool:
    """True for a flat spec in NVIDIA's terms: no ``layers`` and some key only NVIDIA's form has."""
    return "layers" not in data and any(k in NVIDIA_KEYS and k not in NATIVE_KEYS for k in data)


def read_depth_order(root: str | Path) -> list[int] | None:
    """The layers in the order ``elastic train`` drops them (least important first), from the
    ``depth_order`` metadata of ``root/importance.safetensors``; None when the file is absent.

    Raises:
        ConfigError: the file exists but holds no readable depth order.
    """
    path = Path(root) / DEPTH_FILE
    if not path.is_file():
        return None
    from elastic.slicer.formats.safetensors import read_header

    try:
        meta = read_header(path)[0].get("__metadata__") or {}
    except CheckpointError as e:
        raise ConfigError(f"cannot read the depth order: {e.message}", path=str(path)) from None
    try:
        order = json.loads(meta["depth_order"])
        # [[layer, score], ...] as the trainer writes it; a bare list of layers is accepted too
        layers = [entry[0] if isinstance(entry, list) else entry for entry in order]
        if not all(is_int(i) for i in layers):
            raise ValueError
    except (KeyError, TypeError, ValueError, IndexError):
        raise ConfigError("no depth order: expected metadata 'depth_order', a JSON list of [layer, score] "
                          "pairs (least important first), as `elastic train` writes it", path=str(path)) from None
    return layers


def layer_problems(parent: Arch, theirs: LayerArch, mine: LayerArch) -> list[tuple[str, str]]:
    """Why ``mine`` is not a prefix slice of the parent's layer ``theirs``: (field, reason) pairs,
    one layer's part of :meth:`SliceSpec.problems` without the layer's name."""
    out = []
    for f in SPEC_FIELDS[theirs.kind]:
        v, top = getattr(mine, f), getattr(theirs, f)
        if not is_int(v) or not 0 < v <= top:
            out.append((f, f"{f} must be an integer in 1..{top} (the parent's), found {v!r}"))
    if theirs.kind == "mamba" and is_int(mine.mamba_num_heads) and mine.mamba_num_heads % parent.n_groups:
        out.append(("mamba_num_heads", f"mamba_num_heads {mine.mamba_num_heads} is not a multiple of n_groups "
                    f"({parent.n_groups}); heads are trimmed equally inside every group"))
    if theirs.kind == "attention" and is_int(mine.num_attention_heads) \
            and mine.num_attention_heads % theirs.num_key_value_heads:
        out.append(("num_attention_heads", f"num_attention_heads {mine.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads ({theirs.num_key_value_heads}); query heads are trimmed inside each KV "
                    "group"))
    E, G, k, tg = mine.n_routed_experts, parent.n_group, parent.num_experts_per_tok, parent.topk_group
    if theirs.kind == "moe" and is_int(E) and 0 < E <= theirs.n_routed_experts:
        if E % G:
            out.append(("n_routed_experts", f"n_routed_experts {E} is not a multiple of n_group ({G}); experts are "
                        "kept per routing group, the same number in each"))
        elif k > E // G * tg:  # top-k never exceeds what the kept groups hold
            out.append(("n_routed_experts", f"n_routed_experts {E} keeps {E // G} expert(s) in each of n_group ({G}) "
                        f"routing group(s), but a token routes to num_experts_per_tok ({k}) experts within topk_group "
                        f"({tg}) group(s): keep at least {-(-k // tg) * G}"))
    return out


def example_spec(parent: Arch) -> dict[str, Any]:
    """A small valid spec for ``parent`` (for messages): a narrower hidden size, a narrower first layer,
    the last layer dropped (when there is more than one)."""
    first = parent.layers[0]
    trim = {"mamba": ("mamba_head_dim", max(1, first.mamba_head_dim // 2)),
            "attention": ("num_attention_heads", first.num_key_value_heads),
            "mlp": ("intermediate_size", max(1, first.intermediate_size // 2)),
            "moe": ("moe_intermediate_size", max(1, first.moe_intermediate_size // 2))}[first.kind]
    layers: list[dict[str, Any]] = [{"index": 0, trim[0]: trim[1]}]
    if parent.num_hidden_layers > 1:
        layers.append({"index": parent.num_hidden_layers - 1, "keep": False})
    return {"hidden_size": max(1, parent.hidden_size * 3 // 4), "layers": layers}


def empty_spec_error(parent: Arch, source: str | None) -> ConfigError:
    """A spec that names nothing to keep or trim: slicing it would copy the whole parent without a word."""
    return ConfigError(
        "the slice spec specifies nothing (no hidden_size, no layers), so it would keep the whole parent; a spec "
        "says what the child keeps: hidden_size and/or layers (each {\"index\": i, <kept sizes>} or "
        "{\"index\": i, \"keep\": false}; sizes left out keep the parent's), e.g. "
        f"{json.dumps(example_spec(parent))}, or NVIDIA's flat keys ({', '.join(NVIDIA_KEYS)}). To keep the "
        f"parent whole, say so: {{\"hidden_size\": {parent.hidden_size}}}", path=source)


@dataclass(frozen=True)
class SliceSpec:
    """Kept sizes for every layer of a parent; ``layers[i]`` is the parent's layer i, or None if dropped."""

    hidden_size: int
    layers: tuple[LayerArch | None, ...]

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def full(cls, parent: Arch) -> "SliceSpec":
        """The spec that keeps everything (the parent itself)."""
        return cls(parent.hidden_size, tuple(parent.layers))

    @classmethod
    def from_json(cls, data: Any, parent: Arch, source: str | None = None,
                  depth_order: Sequence[int] | None = None) -> "SliceSpec":
        """Parse and validate a spec against its parent; every violation is reported at once.

        Args:
            data: the native form (``hidden_size`` + ``layers``) or NVIDIA's flat form (module doc).
            parent: the architecture the spec cuts.
            source: where ``data`` came from, for messages.
            depth_order: layers least important first, for NVIDIA's ``num_layers``; default: the
                ``depth_order`` of importance.safetensors beside the parent's config.json.

        Raises:
            ConfigError: listing each problem (unknown keys or layer indices, sizes above the
                parent's, Mamba heads not a multiple of n_groups, experts not a multiple of n_group
                or fewer than top-k can route to, ...); or a spec that specifies nothing (``{}``,
                no hidden_size and no layers), which would keep the whole parent unnoticed.
        """
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError("a slice spec must be a JSON object with hidden_size and layers (or NVIDIA's flat "
                              f"keys: {', '.join(NVIDIA_KEYS)})", path=source)
        if is_nvidia_form(data):
            return cls._from_nvidia(data, parent, source, depth_order)
        if "hidden_size" not in data and not data.get("layers") and set(data) <= set(NATIVE_KEYS):
            raise empty_spec_error(parent, source)
        unknown = set(data) - set(NATIVE_KEYS)
        if unknown:
            nvidia = sorted(k for k in unknown if k in NVIDIA_KEYS)
            problems.append(f"unknown keys {sorted(unknown)}; a spec has hidden_size and layers"
                            + (f" (NVIDIA's flat keys {nvidia} cannot be mixed with layers: use one form)"
                               if nvidia else ""))
        hidden = data.get("hidden_size", parent.hidden_size)
        layers: list[LayerArch | None] = list(parent.layers)
        entries = data.get("layers", [])
        if not isinstance(entries, list):
            problems.append("layers must be a list of objects with an index")
            entries = []
        seen: set[int] = set()
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("index"), int) or isinstance(entry.get("index"), bool):
                problems.append(f"layers[{k}] must be an object with an integer index")
                continue
            i = entry["index"]
            if not 0 <= i < len(parent.layers):
                problems.append(f"layers[{k}]: unknown layer index {i} (the parent has layers 0..{len(parent.layers) - 1})")
                continue
            if i in seen:
                problems.append(f"layers[{k}]: layer {i} is listed twice")
            seen.add(i)
            kind = parent.layers[i].kind
            allowed = {"index", "keep", "kind", *SPEC_FIELDS[kind]}
            bad = sorted(set(entry) - allowed)
            if bad:
                problems.append(f"layer {i} is {kind}: {', '.join(bad)} do not apply (allowed: {', '.join(SPEC_FIELDS[kind]) or 'keep'})")
            if "kind" in entry and entry["kind"] != kind:
                problems.append(f"layer {i}: spec says kind {entry['kind']!r}, the parent's layer {i} is {kind}")
            if not isinstance(entry.get("keep", True), bool):
                problems.append(f"layer {i}: keep must be true or false, found {entry['keep']!r:.40}")
                continue
            if entry.get("keep", True) is False:
                layers[i] = None
                continue
            over = {f: entry[f] for f in SPEC_FIELDS[kind] if f in entry}
            layers[i] = replace(parent.layers[i], **over)
        spec = cls(hidden, tuple(layers))
        problems += spec.problems(parent)
        if problems:
            raise ConfigError(
                f"invalid slice spec ({len(problems)} problem{'s' * (len(problems) > 1)})",
                problems=list(dict.fromkeys(problems)),
                path=source,
            )
        return spec

    @classmethod
    def _from_nvidia(cls, data: dict, parent: Arch, source: str | None,
                     depth_order: Sequence[int] | None) -> "SliceSpec":
        """A flat spec in NVIDIA's terms: one size per layer kind, ``num_layers`` kept by depth order."""
        problems: list[str] = []
        unknown = sorted(set(data) - set(NVIDIA_KEYS) - {"name", "budget"})
        if unknown:
            problems.append(f"unknown keys {unknown}; a spec in NVIDIA's terms has {', '.join(NVIDIA_KEYS)}")
        kinds = {layer.kind for layer in parent.layers}
        layers: list[LayerArch | None] = list(parent.layers)
        for key, (kind, f) in NVIDIA_KEYS.items():
            if key not in data or kind is None:
                continue
            if kind not in kinds:
                problems.append(f"{key}: the parent has no {kind} layers")
                continue
            layers = [replace(layer, **{f: data[key]}) if layer is not None and layer.kind == kind else layer
                      for layer in layers]
        nvidia_name = {f: k for k, (_, f) in NVIDIA_KEYS.items()}
        for mine, theirs in zip(layers, parent.layers):
            # one value for every layer of a kind: the same words for each, listed once (below)
            problems += [f"{nvidia_name[f]}: {p}" for f, p in layer_problems(parent, theirs, mine)]
        L = parent.num_hidden_layers
        n = data.get("num_layers", L)
        if not is_int(n) or not 0 < n <= L:
            problems.append(f"num_layers must be an integer in 1..{L} (the parent's), found {n!r:.40}")
        elif n < L:
            config = Path(parent.config_path) if parent.config_path else None
            where = config.parent if config is not None and config.is_file() else None  # the checkpoint
            order = list(depth_order) if depth_order is not None else (read_depth_order(where) if where else None)
            if order is None:
                problems.append(f"num_layers {n} is below the parent's {L}, and which layers to drop comes from the "
                                f"checkpoint's depth order ({DEPTH_FILE}, written by `elastic train`), which "
                                f"{'this checkpoint lacks' if where else 'a config alone does not have'}: give a "
                                'spec with layers, marking the ones to drop {"index": i, "keep": false}')
            elif len(set(order)) != len(order) or not all(is_int(i) and 0 <= i < L for i in order):
                problems.append(f"the depth order {order!r:.80} must list distinct layer indices in 0..{L - 1}")
            elif len(order) < L - n:
                problems.append(f"num_layers {n} drops {L - n} layers, but the depth order ranks only {len(order)} "
                                f"({order}): the trainer can drop at most those")
            else:
                for i in order[:L - n]:
                    layers[i] = None
        spec = cls(data.get("hidden_size", parent.hidden_size), tuple(layers))
        problems = spec._model_problems(parent) + problems
        if problems:
            problems = list(dict.fromkeys(problems))
            raise ConfigError(f"invalid slice spec in NVIDIA's terms ({len(problems)} problem"
                              f"{'s' * (len(problems) > 1)})", problems=problems, path=source)
        return spec

    @classmethod
    def from_file(cls, path: str | Path, parent: Arch) -> "SliceSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("spec file not found", path=str(path)) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"spec is not valid JSON ({str(e)[:80]})", path=str(path)) from None
        except OSError as e:
            raise ConfigError(f"cannot read the spec ({e.strerror})", path=str(path)) from None
        return cls.from_json(data, parent, source=str(path))

    def to_json(self, parent: Arch) -> dict[str, Any]:
        """The JSON form, listing only the layers that differ from the parent."""
        layers = []
        for i, (mine, theirs) in enumerate(zip(self.layers, parent.layers)):
            if mine is None:
                layers.append({"index": i, "kind": theirs.kind, "keep": False})
            elif mine != theirs:
                diff = {f: getattr(mine, f) for f in SPEC_FIELDS[mine.kind] if getattr(mine, f) != getattr(theirs, f)}
                layers.append({"index": i, "kind": theirs.kind, **diff})
        return {"hidden_size": self.hidden_size, "layers": layers}

    # ---- validation ------------------------------------------------------------------------
    def problems(self, parent: Arch) -> list[str]:
        """Every way this spec is not a prefix slice of ``parent``."""
        out = self._model_problems(parent)
        if len(self.layers) == len(parent.layers):
            for i, (mine, theirs) in enumerate(zip(self.layers, parent.layers)):
                if mine is not None:
                    out += [f"layer {i} ({theirs.kind}): {p}" for _, p in layer_problems(parent, theirs, mine)]
        return out

    def _model_problems(self, parent: Arch) -> list[str]:
        """The problems that belong to no one layer: hidden size, layer count, nothing kept."""
        out = []
        d = self.hidden_size
        if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= parent.hidden_size:
            out.append(f"hidden_size must be an integer in 1..{parent.hidden_size} (the parent's), found {d!r}")
        if len(self.layers) != len(parent.layers):
            out.append(f"the spec has {len(self.layers)} layers, the parent {len(parent.layers)}")
            return out
        if all(layer is None for layer in self.layers):
            out.append("every layer is dropped; keep at least one")
        return out

    # ---- what it produces ------------------------------------------------------------------
    def kept_layers(self) -> list[int]:
        """Parent indices of the kept layers, in order (the child's layer k is parent layer kept[k])."""
        return [i for i, layer in enumerate(self.layers) if layer is not None]

    def child_arch(self, parent: Arch) -> Arch:
        """The architecture of the sliced child (kept layers renumbered)."""
        return parent.with_layers(tuple(layer for layer in self.layers if layer is not None), self.hidden_size)

    def parameters(self, parent: Arch) -> int:
        """Total parameters of the child (every expert counted: the memory its weights take)."""
        return self.child_arch(parent).param_counts()["total"]

    def is_full(self, parent: Arch) -> bool:
        return self.hidden_size == parent.hidden_size and tuple(self.layers) == tuple(parent.layers)

