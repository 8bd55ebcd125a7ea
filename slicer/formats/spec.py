"""Slice specs: which prefix of every elastic dimension a nested model keeps. No torch here.

A spec names the kept hidden size and, per parent layer, whether it is kept and its kept sizes
(Mamba heads and head channels, attention heads, FFN width). Sizes left out keep the parent's.
On disk (``--spec spec.json`` and the resolved choices in ``elastic_config.json``):

    {"hidden_size": 48,
     "layers": [{"index": 0, "mamba_num_heads": 4, "mamba_head_dim": 12},
                {"index": 1, "intermediate_size": 128},
                {"index": 3, "keep": false}]}

Example:
    >>> spec = SliceSpec.from_json(json.load(open("spec.json")), parent_arch)
    >>> child = spec.child_arch(parent_arch)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.errors import ConfigError

# per-layer spec fields by kind: what may be trimmed (KV heads, B/C, G, N are never elastic)
SPEC_FIELDS = {
    "mamba": ("mamba_num_heads", "mamba_head_dim"),
    "attention": ("num_attention_heads",),
    "mlp": ("intermediate_size",),
    "moe": (),
}


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
    def from_json(cls, data: Any, parent: Arch, source: str | None = None) -> "SliceSpec":
        """Parse and validate a spec against its parent; every violation is reported at once.

        Raises:
            ConfigError: listing each problem (unknown keys or layer indices, sizes above the
                parent's, Mamba heads not a multiple of n_groups, ...).
        """
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError("a slice spec must be a JSON object with hidden_size and layers", path=source)
        unknown = set(data) - {"hidden_size", "layers", "name", "budget"}
        if unknown:
            problems.append(f"unknown keys {sorted(unknown)}; a spec has hidden_size and layers")
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
        out = []
        d = self.hidden_size
        if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= parent.hidden_size:
            out.append(f"hidden_size must be an integer in 1..{parent.hidden_size} (the parent's), found {d!r}")
        if len(self.layers) != len(parent.layers):
            out.append(f"the spec has {len(self.layers)} layers, the parent {len(parent.layers)}")
            return out
        if all(layer is None for layer in self.layers):
            out.append("every layer is dropped; keep at least one")
        for i, (mine, theirs) in enumerate(zip(self.layers, parent.layers)):
            if mine is None:
                continue
            for f in SPEC_FIELDS[theirs.kind]:
                v, top = getattr(mine, f), getattr(theirs, f)
                if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
                    out.append(f"layer {i} ({theirs.kind}): {f} must be an integer in 1..{top} (the parent's), found {v!r}")
            if theirs.kind == "mamba" and isinstance(mine.mamba_num_heads, int) and mine.mamba_num_heads % parent.n_groups:
                out.append(
                    f"layer {i} (mamba): mamba_num_heads {mine.mamba_num_heads} is not a multiple of n_groups "
                    f"({parent.n_groups}); heads are trimmed equally inside every group"
                )
            if theirs.kind == "attention" and isinstance(mine.num_attention_heads, int) \
                    and mine.num_attention_heads % theirs.num_key_value_heads:
                out.append(
                    f"layer {i} (attention): num_attention_heads {mine.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads ({theirs.num_key_value_heads}); query heads are trimmed inside each KV group"
                )
        return out

    # ---- what it produces ------------------------------------------------------------------
    def kept_layers(self) -> list[int]:
        """Parent indices of the kept layers, in order (the child's layer k is parent layer kept[k])."""
        return [i for i, layer in enumerate(self.layers) if layer is not None]

    def child_arch(self, parent: Arch) -> Arch:
        """The architecture of the sliced child (kept layers renumbered)."""
        return parent.with_layers(tuple(layer for layer in self.layers if layer is not None), self.hidden_size)

    def parameters(self, parent: Arch) -> int:
        return self.child_arch(parent).param_counts()["total"]

    def is_full(self, parent: Arch) -> bool:
        return self.hidden_size == parent.hidden_size and tuple(self.layers) == tuple(parent.layers)

