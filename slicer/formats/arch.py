"""The architecture of a Nemotron-H checkpoint, parsed from its config.json. No torch here.

Reads every config form found in the wild (DESIGN.md section 3):
- NVIDIA's: ``hybrid_override_pattern`` ("M-M*-"), ``num_hidden_layers``, bare ``Infinity``;
- transformers 5.x: ``layers_block_type`` (``mamba``/``attention`` or, from 5.13,
  ``linear_attention``/``full_attention``, plus ``mlp``/``moe``) and ``{"__float__": "Infinity"}``;
- per-layer sizes in ``block_configs``: NVIDIA's Puzzle form (``nemotron_h_puzzle``: per-layer MLP
  widths) and elastic's extension (``nemotron_h_elastic``: per-layer Mamba and attention sizes too).
Writes the legacy string pattern plus ``num_hidden_layers``, which every runtime reads, in one of
three forms (:meth:`Arch.config_form`, docs/runtime-facts.md).

Example:
    >>> arch = Arch.from_config({"hybrid_override_pattern": "M-*", "hidden_size": 64, ...})
    >>> arch.layer_pattern, arch.param_counts()["total"]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.values import is_int

MAX_SIZE = 2**31 - 1  # any size above this is a corrupt config, not a model
# layer kinds, in the order inspect reports them
KINDS = ("mamba", "attention", "mlp", "moe")
PATTERN_CHAR = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
_FROM_CHAR = {c: k for k, c in PATTERN_CHAR.items()}
# every block-type name written by some version of transformers or NVIDIA's code
_FROM_NAME = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "m": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "*": "attention",
    "mlp": "mlp",
    "-": "mlp",
    "moe": "moe",
    "e": "moe",
}
# keys that only describe MoE layers (and multi-token prediction with MoE blocks)
MOE_KEYS = (
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
    "moe_latent_size", "moe_shared_expert_overlap", "n_shared_experts", "routed_scaling_factor", "n_group",
    "topk_group", "norm_topk_prob", "output_router_logits", "mtp_layers_block_type",
)
# The three config forms a model is written in (docs/runtime-facts.md says who loads which):
FORM_STOCK = "nemotron_h"  # every layer of a kind has the same sizes: transformers' own class
FORM_PUZZLE = "nemotron_h_puzzle"  # NVIDIA's Puzzle form: per-layer MLP widths, Mamba/attention global
FORM_EXTENSION = "nemotron_h_elastic"  # elastic's extension: per-layer Mamba/attention sizes as well
FORMS = (FORM_STOCK, FORM_PUZZLE, FORM_EXTENSION)
# NVIDIA's Puzzle block entries (its NemotronHPuzzleConfig builds one dataclass per block type;
# docs/runtime-facts.md section 1): the keys each may carry. The sizes elastic models are in
# LAYER_FIELDS; ssm_state_size must equal the global one, sliding_window must be null.
PUZZLE_BLOCK_KEYS = {
    "mamba": ("ssm_state_size",),
    "attention": ("sliding_window",),
    "mlp": ("intermediate_size",),
    "moe": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
            "moe_latent_size", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob"),
}
# per-layer fields that block_configs may override, by layer kind
LAYER_FIELDS = {
    "mamba": ("mamba_num_heads", "mamba_head_dim"),
    "attention": ("num_attention_heads", "num_key_value_heads"),
    "mlp": ("intermediate_size",),
    "moe": ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size"),
}


@dataclass(frozen=True)
class LayerArch:
    """One layer: its kind and the sizes that may differ from layer to layer."""

    kind: str  # "mamba" | "attention" | "mlp" | "moe"
    mamba_num_heads: int = 0  # H: Mamba-2 heads (a multiple of n_groups)
    mamba_head_dim: int = 0  # P: channels per Mamba head
    num_attention_heads: int = 0  # query heads
    num_key_value_heads: int = 0  # KV heads (GQA groups)
    intermediate_size: int = 0  # F: MLP width
    n_routed_experts: int = 0  # E: routed experts of a MoE layer
    moe_intermediate_size: int = 0  # width of each routed expert
    moe_shared_expert_intermediate_size: int = 0  # width of the shared expert

    @property
    def mamba_intermediate(self) -> int:
        """I = H * P, the width of the Mamba x and z streams."""
        return self.mamba_num_heads * self.mamba_head_dim

    def sizes(self) -> dict[str, int]:
        """The per-layer size fields that matter for this layer's kind."""
        return {f: getattr(self, f) for f in LAYER_FIELDS[self.kind]}


@dataclass(frozen=True)
class Arch:
    """Everything needed to build the model or count its parameters, with HF key names."""

    vocab_size: int
    hidden_size: int
    layers: tuple[LayerArch, ...]
    n_groups: int  # G: B/C groups of every Mamba layer
    ssm_state_size: int  # N
    conv_kernel: int  # K
    use_conv_bias: bool
    use_bias: bool  # bias of the Mamba in_proj/out_proj
    head_dim: int  # attention head size
    mlp_bias: bool
    layer_norm_epsilon: float
    chunk_size: int  # SSD chunk length for prefill
    time_step_limit: tuple[float, float]  # clamp of dt after softplus
    tie_word_embeddings: bool
    residual_in_fp32: bool
    # MoE routing, one setting for every MoE layer (the sizes are per layer, in LayerArch)
    num_experts_per_tok: int = 0  # top-k
    n_group: int = 1  # routing groups of experts
    topk_group: int = 1  # groups a token may route to
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    moe_latent_size: int | None = None  # experts compute in this width (fc1/fc2 latent projections) if set
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # the config.json this was read from (None for a dict or a slice's shape): where the checkpoint's
    # sidecar files are (importance.safetensors: the depth order a spec in NVIDIA's terms may need)
    config_path: str | None = field(default=None, compare=False, hash=False, repr=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_pattern(self) -> str:
        """The legacy pattern string, e.g. "M-M*-"."""
        return "".join(PATTERN_CHAR[layer.kind] for layer in self.layers)

    def is_homogeneous(self) -> bool:
        """True when every layer of a kind has the same sizes (a stock config can describe it)."""
        return all(self.uniform(kind) for kind in KINDS)

    def uniform(self, kind: str) -> bool:
        """True when every layer of ``kind`` has the same sizes (or there is none)."""
        return len({tuple(layer.sizes().items()) for layer in self.layers if layer.kind == kind}) <= 1

    def config_form(self) -> str:
        """How :meth:`to_config` writes this model: ``FORM_STOCK`` when homogeneous; NVIDIA's
        ``FORM_PUZZLE`` when only MLP and MoE sizes differ per layer; else ``FORM_EXTENSION``."""
        if self.is_homogeneous():
            return FORM_STOCK
        if self.uniform("mamba") and self.uniform("attention"):  # MLP and MoE sizes per layer: NVIDIA's form
            return FORM_PUZZLE
        return FORM_EXTENSION

    # ---- tensors and parameters ----------------------------------------------------------
    def layer_tensor_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Shapes of layer i's tensors, keyed by their name under ``backbone.layers.{i}.``."""
        layer, d = self.layers[i], self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"norm.weight": (d,)}
        if layer.kind == "mamba":
            H, I, G, N = layer.mamba_num_heads, layer.mamba_intermediate, self.n_groups, self.ssm_state_size
            conv_dim = I + 2 * G * N  # conv runs over [x | B | C]
            shapes["mixer.in_proj.weight"] = (2 * I + 2 * G * N + H, d)  # rows [z | x | B | C | dt]
            if self.use_bias:
                shapes["mixer.in_proj.bias"] = (2 * I + 2 * G * N + H,)
            shapes["mixer.conv1d.weight"] = (conv_dim, 1, self.conv_kernel)
            if self.use_conv_bias:
                shapes["mixer.conv1d.bias"] = (conv_dim,)
            shapes["mixer.A_log"] = (H,)
            shapes["mixer.D"] = (H,)
            shapes["mixer.dt_bias"] = (H,)
            shapes["mixer.norm.weight"] = (I,)
            shapes["mixer.out_proj.weight"] = (d, I)
            if self.use_bias:
                shapes["mixer.out_proj.bias"] = (d,)
        elif layer.kind == "attention":
            q, kv = layer.num_attention_heads * self.head_dim, layer.num_key_value_heads * self.head_dim
            shapes["mixer.q_proj.weight"] = (q, d)
            shapes["mixer.k_proj.weight"] = (kv, d)
            shapes["mixer.v_proj.weight"] = (kv, d)
            shapes["mixer.o_proj.weight"] = (d, q)
        elif layer.kind == "mlp":
            F = layer.intermediate_size
            shapes["mixer.up_proj.weight"] = (F, d)
            shapes["mixer.down_proj.weight"] = (d, F)
            if self.mlp_bias:
                shapes["mixer.up_proj.bias"] = (F,)
                shapes["mixer.down_proj.bias"] = (d,)
        else:  # moe, in NVIDIA's on-disk form: one tensor per expert (transformers merges them at load)
            E, Fe, Fs = layer.n_routed_experts, layer.moe_intermediate_size, layer.moe_shared_expert_intermediate_size
            inner = self.moe_latent_size or d
            shapes["mixer.gate.weight"] = (E, d)
            shapes["mixer.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                shapes[f"mixer.experts.{e}.up_proj.weight"] = (Fe, inner)
                shapes[f"mixer.experts.{e}.down_proj.weight"] = (inner, Fe)
            shapes["mixer.shared_experts.up_proj.weight"] = (Fs, d)
            shapes["mixer.shared_experts.down_proj.weight"] = (d, Fs)
            if self.moe_latent_size:
                shapes["mixer.fc1_latent_proj.weight"] = (inner, d)
                shapes["mixer.fc2_latent_proj.weight"] = (d, inner)
            if self.mlp_bias:
                for e in range(E):
                    shapes[f"mixer.experts.{e}.up_proj.bias"] = (Fe,)
                    shapes[f"mixer.experts.{e}.down_proj.bias"] = (inner,)
                shapes["mixer.shared_experts.up_proj.bias"] = (Fs,)
                shapes["mixer.shared_experts.down_proj.bias"] = (d,)
                if self.moe_latent_size:
                    shapes["mixer.fc1_latent_proj.bias"] = (inner,)
                    shapes["mixer.fc2_latent_proj.bias"] = (d,)
        return shapes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its on-disk (``backbone.``) name."""
        shapes = {"backbone.embeddings.weight": (self.vocab_size, self.hidden_size)}
        for i in range(len(self.layers)):
            for name, shape in self.layer_tensor_shapes(i).items():
                shapes[f"backbone.layers.{i}.{name}"] = shape
        shapes["backbone.norm_f.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def routed_expert_params(self, i: int) -> int:
        """Parameters of one routed expert of MoE layer i (its up/down projections and their biases)."""
        layer = self.layers[i]
        inner, Fe = self.moe_latent_size or self.hidden_size, layer.moe_intermediate_size
        return 2 * Fe * inner + (Fe + inner if self.mlp_bias else 0)

    def param_counts(self) -> dict[str, int]:
        """Parameters per layer kind plus embeddings, final norm and LM head; ``total`` sums them
        (every tensor of the checkpoint: the memory the weights take). ``active``: the parameters
        one token computes with, ``total`` less the routed experts it is not sent to, E - top_k
        in every MoE layer. The gate (router), its correction bias, the shared expert and the
        latent projections count as active: every token runs them. Equal to ``total`` for a
        dense model.

        Example:
            >>> c = arch.param_counts(); c["total"], c["active"]
        """
        counts = {k: 0 for k in KINDS if any(layer.kind == k for layer in self.layers)}
        idle = 0  # routed-expert parameters a token does not use
        for i, layer in enumerate(self.layers):
            counts[layer.kind] += sum(math.prod(s) for s in self.layer_tensor_shapes(i).values())
            if layer.kind == "moe":
                idle += (layer.n_routed_experts - self.num_experts_per_tok) * self.routed_expert_params(i)
        counts["embeddings"] = self.vocab_size * self.hidden_size
        counts["norm_f"] = self.hidden_size
        counts["lm_head"] = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        counts["total"] = sum(counts.values())
        counts["active"] = counts["total"] - idle
        return counts

    # ---- config.json I/O -----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], source: str | None = None) -> "Arch":
        """Parse and validate a ``nemotron_h`` config dict; every violation is reported at once.

        Raises:
            ConfigError: listing each problem found.
        """
        return _parse(config, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Arch":
        """Read ``config.json`` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_config(read_config(path), source=str(path))

    def to_config(self) -> dict[str, Any]:
        """The config dict to write: the source's other keys kept, sizes and layout rewritten.

        Layout is written in NVIDIA's form (``hybrid_override_pattern`` + ``num_hidden_layers``),
        which transformers 4.x/5.x, vLLM and llama.cpp's converter all read. Per-layer sizes go to
        ``block_configs`` in the form :meth:`config_form` names:

        - ``nemotron_h_puzzle`` (NVIDIA's): ``{"block_type": "mamba"}``, ``{"block_type":
          "attention"}``, ``{"block_type": "mlp", "intermediate_size": F}``; the per-layer field
          is removed from the top level, as NVIDIA's config does with its "blockwise members";
        - ``nemotron_h_elastic`` (elastic's extension): every layer's own sizes, e.g.
          ``{"block_type": "mamba", "mamba_num_heads": 64, "mamba_head_dim": 80}``.

        Either carries the ``auto_map`` of the modeling code in ``elastic.slicer.remote_code``,
        which the output directory must also hold (``remote_code.FILES``).
        """
        from elastic.slicer import remote_code

        cfg = {k: v for k, v in self.raw.items()
               if k not in ("layers_block_type", "block_configs", "mtp_block_configs", "auto_map", "blockwise_members")}
        cfg.update(
            model_type="nemotron_h",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            hybrid_override_pattern=self.layer_pattern,
            num_hidden_layers=self.num_hidden_layers,
            n_groups=self.n_groups,
            ssm_state_size=self.ssm_state_size,
            conv_kernel=self.conv_kernel,
            head_dim=self.head_dim,
            chunk_size=self.chunk_size,
            time_step_limit=list(self.time_step_limit),  # json writes inf as bare Infinity
            tie_word_embeddings=self.tie_word_embeddings,
            # what the model computes with, stated even where the source left it to a default
            layer_norm_epsilon=self.layer_norm_epsilon,
            use_conv_bias=self.use_conv_bias,
            use_bias=self.use_bias,
            mlp_bias=self.mlp_bias,
            residual_in_fp32=self.residual_in_fp32,
            mlp_hidden_act="relu2",  # the only ones the reference model (and the parser) accept
            mamba_hidden_act="silu",
        )
        for alias, key in (("rms_norm_eps", "layer_norm_epsilon"), ("mamba_conv_bias", "use_conv_bias")):
            if alias in cfg:
                cfg[alias] = cfg[key]  # an alias kept from the source says the same
        for old in ("mamba_n_groups", "mamba_d_conv", "mamba_chunk_size", "mamba_dt_limit"):
            cfg.pop(old, None)  # aliases of keys written above; a stale alias would win on load
        if not any(layer.kind == "moe" for layer in self.layers):
            # llama.cpp's converter takes MoE keys (transformers 5 writes defaults) as a MoE model
            for key in MOE_KEYS:
                cfg.pop(key, None)
        else:  # stated, as NVIDIA's configs do: llama.cpp's converter reads it (KeyError without it)
            cfg["n_shared_experts"] = 1
        # global sizes: the first layer of each kind (all of them when homogeneous)
        for kind in LAYER_FIELDS:
            first = next((layer for layer in self.layers if layer.kind == kind), None)
            if first is not None:
                cfg.update(first.sizes())
        if "mamba_head_dim" in cfg:
            # llama.cpp's converter splits the Mamba width into heads of mamba_d_head (default 64) and
            # asserts it divides; stating the real head size makes any head size convert
            cfg["mamba_d_head"] = cfg["mamba_head_dim"]
        form = self.config_form()
        cfg.update(remote_code.identity(form))
        if form == FORM_PUZZLE:
            cfg["block_configs"] = [{"block_type": layer.kind, **(layer.sizes() if layer.kind in ("mlp", "moe") else {})}
                                    for layer in self.layers]
            cfg.pop("intermediate_size", None)
        elif form == FORM_EXTENSION:
            cfg["block_configs"] = [{"block_type": layer.kind, **layer.sizes()} for layer in self.layers]
        if form != FORM_STOCK:
            cfg["mtp_block_configs"] = []  # no multi-token-prediction head (vLLM would build one)
            cfg["num_nextn_predict_layers"] = 0
        return cfg

    def with_layers(self, layers: tuple[LayerArch, ...], hidden_size: int | None = None) -> "Arch":
        """A copy with other layers (and hidden size): the shape of a slice."""
        return replace(self, layers=tuple(layers), hidden_size=hidden_size or self.hidden_size, config_path=None)


# ---- parsing ----------------------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    """Load a config.json, accepting bare ``Infinity``/``NaN`` (NVIDIA) as Python's json does."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"is a link to {os.readlink(path)}, which is missing (an interrupted download?)",
                          path=str(path))
    if not path.is_file():
        raise ConfigError("config.json not found; a checkpoint directory must contain one", path=str(path))
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"not valid JSON ({str(e)[:80]})", path=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read ({e.strerror})", path=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object at the top level", path=str(path))
    return data


def _is_size(v: Any) -> bool:
    """A size elastic accepts: an integer in 1..MAX_SIZE."""
    return is_int(v) and 0 < v <= MAX_SIZE


def _as_float(v: Any) -> float:
    """A float from a number, "Infinity"/"inf" or transformers 5's ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(v)
    return float(v)  # float("Infinity") and float("inf") both work


# keys read under another name too: (the key elastic reads, its alias). Readers differ in which wins
# when both are given (transformers' NemotronHConfig takes the mamba_* names, elastic the key), so both
# present with different values describe two models: refused (:func:`_alias_problems`)
ALIASES = (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"), ("chunk_size", "mamba_chunk_size"),
           ("time_step_limit", "mamba_dt_limit"), ("use_conv_bias", "mamba_conv_bias"),
           ("layer_norm_epsilon", "rms_norm_eps"), ("n_routed_experts", "num_local_experts"),
           ("head_dim", "attention_head_dim"))


class _Reader:
    """Typed reads of one config dict. A value that is not what its key needs is recorded in
    ``problems`` (every one, so that the error lists them all) and a default is returned."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None, *aliases: str) -> Any:
        """The first of key/aliases present. An explicit null is returned as None (and refused by
        the typed readers below): transformers keeps it as None and fails later."""
        for k in (key, *aliases):
            if k in self.cfg:
                return self.cfg[k]
        return default

    def positive_int(self, key: str, default: Any = None, *aliases: str) -> int:
        v = self.get(key, default, *aliases)
        if not _is_size(v):
            missing = v is None and not any(k in self.cfg for k in (key, *aliases))
            self.problems.append(f"{key} must be an integer in 1..{MAX_SIZE}, "
                                 f"{'it is missing' if missing else f'found {v!r:.40}'}")
            return 0
        return v

    def flag(self, key: str, default: bool, *aliases: str) -> bool:
        v = self.get(key, default, *aliases)
        if not isinstance(v, bool):
            self.problems.append(f"{key} must be true or false, found {v!r:.40}")
            return default
        return v

    def number(self, key: str, default: float, lo: float, hi: float, *aliases: str) -> float:
        """A finite number in (lo, hi)."""
        v = self.get(key, default, *aliases)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo < v < hi):
            self.problems.append(f"{key} must be a finite number between {lo:g} and {hi:g} (exclusive), "
                                 f"found {v!r:.40}")
            return default
        return float(v)

    def time_step_limit(self) -> tuple[float, float]:
        """``[low, high]``, the clamp of every dt after its softplus (NVIDIA's kernels and the reference
        model apply it in prefill and decode): 0 <= low < high, low finite, high may be Infinity. A
        range of one value (``[0.0, 0.0]`` stops every Mamba state from ever changing) makes dt a
        constant instead of the model's input-dependent step: not a trained Nemotron-H."""
        limit = self.get("time_step_limit", [0.0, math.inf], "mamba_dt_limit")
        try:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise ValueError
            lo, hi = _as_float(limit[0]), _as_float(limit[1])
            if not (math.isfinite(lo) and 0 <= lo < hi) or math.isnan(hi):
                raise ValueError
            return lo, hi
        except (TypeError, ValueError, KeyError, OverflowError):
            self.problems.append(
                f"time_step_limit must be [low, high] with 0 <= low < high, low finite (high may be Infinity), found "
                f"{limit!r:.60}: it clamps every Mamba dt, and a range of one value or less makes dt a constant "
                "(with high 0 no Mamba state ever changes). Nemotron-H checkpoints carry [0.0, Infinity]")
            return 0.0, math.inf


def _alias_problems(cfg: dict[str, Any]) -> list[str]:
    """A key and its alias (:data:`ALIASES`) both given with different values."""
    def same(a: Any, b: Any) -> bool:
        try:  # 1e-5 and 1.0e-05, Infinity and {"__float__": "Infinity"} are one value
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                return len(a) == len(b) and all(_as_float(x) == _as_float(y) for x, y in zip(a, b))
            if not isinstance(a, bool) and not isinstance(b, bool):
                return _as_float(a) == _as_float(b)
        except (TypeError, ValueError, OverflowError):
            pass
        return a == b

    return [f"{key} is {cfg[key]!r:.40} but {alias}, another name for the same setting, is {cfg[alias]!r:.40}: "
            f"readers differ in which they take (transformers prefers the mamba_* names, elastic reads {key}), so "
            "the checkpoint describes two models; remove one or make them equal"
            for key, alias in ALIASES if key in cfg and alias in cfg and not same(cfg[key], cfg[alias])]


# what config.json's dtype / torch_dtype may name (torch's floating dtypes; transformers' "auto")
CONFIG_DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def _global_problems(cfg: dict[str, Any]) -> list[str]:
    """Keys checked whatever the layers: token ids, strings, the sizes a slice copies, the model type,
    aliases that disagree."""
    problems = []
    vocab_for_ids = cfg["vocab_size"] if is_int(cfg.get("vocab_size")) and cfg["vocab_size"] > 0 else MAX_SIZE
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        ids = v if key == "eos_token_id" and isinstance(v, list) and v else [v]
        if v is not None and not all(is_int(t) and 0 <= t < vocab_for_ids for t in ids):
            problems.append(f"{key} must be a token id in 0..{vocab_for_ids - 1} or null, found {v!r:.40}")
    for key in ("model_type", "mlp_hidden_act", "mamba_hidden_act", "hybrid_override_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"{key} must be a string, found {cfg[key]!r:.40}")
    for key in ("n_groups", "ssm_state_size", "conv_kernel", "num_hidden_layers", "moe_latent_size"):
        v = cfg.get(key)
        if v is not None and not _is_size(v):
            problems.append(f"{key} must be an integer in 1..{MAX_SIZE}, found {v!r:.40}")
    for key in ("time_step_min", "time_step_max", "time_step_floor"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            problems.append(f"{key} must be a finite number >= 0, found {v!r:.40}")
    for key in ("dtype", "torch_dtype"):  # transformers loads the weights in it: a name torch knows
        v = cfg.get(key)
        if v is not None and v not in CONFIG_DTYPES:
            problems.append(f"{key} must be one of {', '.join(CONFIG_DTYPES)} (the weights' dtype transformers "
                            f"loads), found {v!r:.40}")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in FORMS:
        problems.append(f"model_type is {model_type!r}; elastic reads nemotron_h checkpoints only "
                        f"({', '.join(FORMS)})")
    return problems + _alias_problems(cfg)


def _layout(cfg: dict[str, Any], problems: list[str]) -> list[str]:
    """The layer kinds, from ``layers_block_type`` or ``hybrid_override_pattern`` ("?" where unknown)."""
    kinds: list[str] = []
    if cfg.get("layers_block_type") is not None:
        names = cfg["layers_block_type"]
        if not isinstance(names, list):
            problems.append(f"layers_block_type must be a list of names, found {type(names).__name__}")
            names = []
        for i, name in enumerate(names):
            kind = _FROM_NAME.get(name.lower()) if isinstance(name, str) else None
            if kind is None:
                problems.append(
                    f"layers_block_type[{i}] is {name!r}; known types: "
                    "mamba/linear_attention, attention/full_attention, mlp, moe"
                )
            kinds.append(kind or "?")
    elif cfg.get("hybrid_override_pattern") is not None:
        pattern = cfg["hybrid_override_pattern"]
        for i, ch in enumerate(pattern if isinstance(pattern, str) else ""):
            kind = _FROM_CHAR.get(ch)
            if kind is None:
                problems.append(
                    f"hybrid_override_pattern[{i}] is {ch!r}; known: 'M' Mamba-2, '*' attention, '-' MLP, 'E' MoE"
                )
            kinds.append(kind or "?")
    else:
        problems.append("no layer layout: expected hybrid_override_pattern or layers_block_type")
    if not kinds and not problems:
        problems.append("the layer layout is empty")
    n_declared = cfg.get("num_hidden_layers")
    if is_int(n_declared) and kinds and n_declared != len(kinds):
        problems.append(f"num_hidden_layers is {n_declared} but the layer layout has {len(kinds)} layers")
    return kinds


def _moe_fields(r: _Reader, present: set[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """(the MoE layers' default sizes, the routing settings) when there is an MoE layer, else ({}, {})."""
    if "moe" not in present:
        return {}, {}
    sizes = dict(
        n_routed_experts=r.positive_int("n_routed_experts", 8, "num_local_experts"),
        moe_intermediate_size=r.positive_int("moe_intermediate_size", 7688),
        moe_shared_expert_intermediate_size=r.positive_int("moe_shared_expert_intermediate_size", 7688),
    )
    top_k, n_group, topk_group = (r.positive_int("num_experts_per_tok", 2), r.positive_int("n_group", 1),
                                  r.positive_int("topk_group", 1))
    latent = r.get("moe_latent_size")
    if latent is not None and not _is_size(latent):
        r.problems.append(f"moe_latent_size must be null or a positive integer, found {latent!r:.40}")
        latent = None
    moe = dict(num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
               routed_scaling_factor=r.number("routed_scaling_factor", 1.0, 0.0, 1e6),
               norm_topk_prob=r.flag("norm_topk_prob", True), moe_latent_size=latent)
    if n_group and topk_group > n_group:
        r.problems.append(f"topk_group ({topk_group}) is more than n_group ({n_group})")
    n_shared = r.get("n_shared_experts", 1)
    if n_shared != 1:
        r.problems.append(f"n_shared_experts is {n_shared!r}; Nemotron-H MoE layers have one shared expert")
    return sizes, moe


def _block_overrides(cfg: dict[str, Any], layers: list[LayerArch], state: int, problems: list[str]) -> None:
    """Apply ``block_configs`` (per-layer sizes of a heterogeneous model) to ``layers`` in place."""
    blocks = cfg.get("block_configs")
    if blocks is None:
        return
    if not isinstance(blocks, list) or len(blocks) != len(layers):
        n = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        problems.append(f"block_configs must be a list with one entry per layer ({len(layers)}), found {n}")
        return
    for i, (block, layer) in enumerate(zip(blocks, layers)):
        if not isinstance(block, dict):
            problems.append(f"block_configs[{i}] must be an object")
            continue
        btype = block.get("block_type")
        if btype is not None and _FROM_NAME.get(str(btype).lower()) != layer.kind:
            problems.append(f"block_configs[{i}].block_type is {btype!r} but layer {i} is {layer.kind}")
        known = {"block_type", *LAYER_FIELDS.get(layer.kind, ()), *PUZZLE_BLOCK_KEYS.get(layer.kind, ())}
        unknown = sorted(str(k) for k in block if k not in known)
        if unknown:
            problems.append(f"block_configs[{i}] ({layer.kind}) has {', '.join(map(repr, unknown))}, which "
                            "elastic does not model; known: " + ", ".join(sorted(known - {"block_type"})))
        if layer.kind == "mamba" and block.get("ssm_state_size", state) != state:
            problems.append(f"block_configs[{i}].ssm_state_size is {block['ssm_state_size']!r}; elastic models "
                            f"one state size for all Mamba layers (ssm_state_size {state})")
        if layer.kind == "attention" and block.get("sliding_window") is not None:
            problems.append(f"block_configs[{i}].sliding_window is {block['sliding_window']!r}; elastic models "
                            "full attention only")
        if layer.kind == "mlp" and "intermediate_size" not in block and "intermediate_size" not in cfg:
            problems.append(f"block_configs[{i}] (mlp) has no intermediate_size and there is no global one")
        over = {}
        for f in LAYER_FIELDS.get(layer.kind, ()):
            if f in block:
                v = block[f]
                if not _is_size(v):
                    problems.append(f"block_configs[{i}].{f} must be a positive integer, found {v!r}")
                else:
                    over[f] = v
        layers[i] = replace(layer, **over)


def _layer_problems(layers: list[LayerArch], n_groups: Any, moe: dict[str, Any]) -> list[str]:
    """The invariants of each layer's sizes (heads in whole groups, experts in whole routing groups)."""
    problems = []
    for i, layer in enumerate(layers):
        if layer.kind == "mamba" and n_groups and layer.mamba_num_heads % n_groups:
            problems.append(
                f"layer {i}: mamba_num_heads ({layer.mamba_num_heads}) is not a multiple of n_groups ({n_groups})"
            )
        if layer.kind == "attention" and layer.num_key_value_heads and layer.num_attention_heads % layer.num_key_value_heads:
            problems.append(
                f"layer {i}: num_attention_heads ({layer.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({layer.num_key_value_heads})"
            )
        if layer.kind == "moe" and moe:
            E, k = layer.n_routed_experts, moe["num_experts_per_tok"]
            if moe["n_group"] and E % moe["n_group"]:
                problems.append(f"layer {i}: n_routed_experts ({E}) is not a multiple of n_group ({moe['n_group']})")
            elif moe["n_group"] and k > E // moe["n_group"] * moe["topk_group"]:
                problems.append(f"layer {i}: num_experts_per_tok ({k}) is more than the experts of topk_group "
                                f"({moe['topk_group']}) groups of {E // moe['n_group']}")
    return problems


def _parse(cfg: dict[str, Any], source: str | None) -> Arch:
    r = _Reader(cfg)
    problems = r.problems
    problems += _global_problems(cfg)
    kinds = _layout(cfg, problems)
    present = set(kinds)
    hidden = r.positive_int("hidden_size")
    vocab = r.positive_int("vocab_size")
    # Mamba fields matter only when there is a Mamba layer; same for attention, MLP and MoE
    z = 0
    mamba = "mamba" in present
    n_groups = r.positive_int("n_groups", 8, "mamba_n_groups") if mamba else r.get("n_groups", 8)
    state = r.positive_int("ssm_state_size", 128) if mamba else r.get("ssm_state_size", 128)
    conv_k = r.positive_int("conv_kernel", 4, "mamba_d_conv") if mamba else r.get("conv_kernel", 4)
    m_heads = r.positive_int("mamba_num_heads", 128) if mamba else z
    m_dim = r.positive_int("mamba_head_dim", 64) if mamba else z
    a_heads = r.positive_int("num_attention_heads", 32) if "attention" in present else z
    # transformers' NemotronHConfig: num_key_value_heads absent -> 8, null -> num_attention_heads;
    # head_dim absent -> 128 (its attention reads config.head_dim, never hidden // heads)
    kv_default = a_heads if "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None else 8
    kv_heads = r.positive_int("num_key_value_heads", kv_default) if "attention" in present else z
    head_dim = r.get("head_dim", 128, "attention_head_dim")
    if "attention" in present and not _is_size(head_dim):
        problems.append(f"head_dim must be an integer in 1..{MAX_SIZE}, found {head_dim!r:.40}")
        head_dim = 0
    ffn = r.positive_int("intermediate_size", 21504) if "mlp" in present else z
    chunk = r.positive_int("chunk_size", 128, "mamba_chunk_size")
    time_step_limit = r.time_step_limit()
    eps = r.number("layer_norm_epsilon", 1e-5, 0.0, 1.0, "rms_norm_eps")
    bools = {k: r.flag(k, d, *a) for k, d, *a in (("use_conv_bias", True, "mamba_conv_bias"), ("use_bias", False),
                                                   ("mlp_bias", False), ("tie_word_embeddings", False),
                                                   ("residual_in_fp32", False))}
    act = r.get("mlp_hidden_act", "relu2")
    if present & {"mlp", "moe"} and act != "relu2":  # MoE experts use it too (transformers' NemotronHExperts)
        problems.append(f"mlp_hidden_act is {act!r}; Nemotron-H MLPs and MoE experts are squared ReLU ('relu2')")
    if mamba and r.get("mamba_hidden_act", "silu") != "silu":
        problems.append(f"mamba_hidden_act is {r.get('mamba_hidden_act')!r}; the Mamba-2 mixer uses 'silu'")
    moe_sizes, moe = _moe_fields(r, present)
    defaults = LayerArch(kind="?", mamba_num_heads=m_heads, mamba_head_dim=m_dim, num_attention_heads=a_heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, **moe_sizes)
    # each layer carries only the sizes of its own kind (others stay 0), so equal layers compare equal
    layers = [LayerArch(kind=k, **{f: getattr(defaults, f) for f in LAYER_FIELDS.get(k, ())}) for k in kinds]
    _block_overrides(cfg, layers, state, problems)
    problems += _layer_problems(layers, n_groups, moe)
    if problems:
        # de-duplicate (a per-layer problem repeats on every layer) but keep the order
        raise ConfigError(
            f"invalid nemotron_h config ({len(problems)} problem{'s' * (len(problems) > 1)})",
            problems=list(dict.fromkeys(problems)),
            path=source,
        )
    return Arch(vocab_size=vocab, hidden_size=hidden, layers=tuple(layers), n_groups=n_groups, ssm_state_size=state,
                conv_kernel=conv_k, use_conv_bias=bools["use_conv_bias"], use_bias=bools["use_bias"],
                head_dim=head_dim or 0, mlp_bias=bools["mlp_bias"], layer_norm_epsilon=eps, chunk_size=chunk,
                time_step_limit=time_step_limit, tie_word_embeddings=bools["tie_word_embeddings"],
                residual_in_fp32=bools["residual_in_fp32"], raw=dict(cfg), config_path=source, **moe)
