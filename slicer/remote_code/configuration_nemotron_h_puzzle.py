"""Config classes for Nemotron-H checkpoints whose layers differ in size.

Shipped by elastic next to such a checkpoint and loaded by transformers (>= 5.6) with
``trust_remote_code=True``; vLLM calls ``get_nemotron_h_config_for_layer`` on it too.

``NemotronHPuzzleConfig`` (``model_type`` "nemotron_h_puzzle") reads NVIDIA's Puzzle form:
``block_configs`` holds one entry per layer, ``block_type`` plus the fields NVIDIA's Puzzle
config gives that block type; the other sizes are global:

    {"block_type": "mamba"}                  (optional: ssm_state_size)
    {"block_type": "attention"}              (sliding_window: null only; full attention here)
    {"block_type": "mlp", "intermediate_size": 15360}
    {"block_type": "moe", "moe_intermediate_size": 1856, "num_experts_per_tok": 6, ...}

``NemotronHElasticConfig`` (``model_type`` "nemotron_h_elastic") is elastic's extension: its
entries may also carry per-layer Mamba and attention sizes, which no serving runtime reads:

    {"block_type": "mamba", "mamba_num_heads": 64, "mamba_head_dim": 80}
    {"block_type": "attention", "num_attention_heads": 32, "num_key_value_heads": 8}

Example:
    >>> config.get_nemotron_h_config_for_layer(3).intermediate_size
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

# every block-type name in use (NVIDIA's, transformers 5 < 5.13, >= 5.13) -> the config's own name
_CANONICAL = {
    "mamba": "linear_attention",
    "linear_attention": "linear_attention",
    "attention": "full_attention",
    "full_attention": "full_attention",
    "mlp": "mlp",
    "moe": "moe",
}
# NVIDIA's Puzzle schema: the keys a block of each type may carry (besides block_type)
_PUZZLE_KEYS = {
    "linear_attention": {"ssm_state_size"},
    "full_attention": {"sliding_window"},
    "mlp": {"intermediate_size"},
    "moe": {"n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
            "moe_latent_size", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob"},
}
# elastic's extension adds per-layer Mamba and attention sizes
_EXTENSION_KEYS = {
    "linear_attention": {"mamba_num_heads", "mamba_head_dim"},
    "full_attention": {"num_attention_heads", "num_key_value_heads"},
}
_OPTIONAL_NULL = {"sliding_window", "moe_latent_size"}  # may be null


@strict  # re-applied so that validate_block_configs runs (transformers' configs do the same)
class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"
    _extension = False

    # one entry per layer: "block_type" plus the fields that override the global ones; None = homogeneous
    block_configs: list[dict] | None = None
    mtp_block_configs: list[dict] | None = None

    def validate_block_configs(self):
        """Part of the ``@strict`` validation: one well-typed entry per layer, all problems at once."""
        if self.block_configs is None:
            return
        kinds = self.layers_block_type
        if len(self.block_configs) != len(kinds):
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for {len(kinds)} layers")
        problems = []
        for i, (block, kind) in enumerate(zip(self.block_configs, kinds)):
            kind = _CANONICAL.get(kind, kind)
            btype = block.get("block_type")
            if btype is not None and _CANONICAL.get(btype) != kind:
                problems.append(f"block_configs[{i}].block_type is {btype!r} but layer {i} is {kind!r}")
            allowed = _PUZZLE_KEYS.get(kind, set()) | (_EXTENSION_KEYS.get(kind, set()) if self._extension else set())
            for k, v in block.items():
                if k == "block_type":
                    continue
                if k not in allowed:
                    problems.append(f"block_configs[{i}] ({kind}) may not carry {k!r}" + (
                        "" if self._extension or k not in _EXTENSION_KEYS.get(kind, ()) else
                        " in NVIDIA's Puzzle form (per-layer Mamba/attention sizes are model_type nemotron_h_elastic)"))
                elif v is None and k in _OPTIONAL_NULL:
                    continue
                elif k == "sliding_window":
                    problems.append(f"block_configs[{i}].sliding_window is {v!r}; this modeling code computes full "
                                    "attention only")
                elif k not in ("routed_scaling_factor", "norm_topk_prob") and (
                        isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                    problems.append(f"block_configs[{i}].{k} must be a positive integer, found {v!r}")
            if kind == "mlp" and "intermediate_size" not in block:
                problems.append(f"block_configs[{i}] (mlp) needs intermediate_size")
        if problems:
            raise ValueError("; ".join(problems))

    def get_nemotron_h_config_for_layer(self, layer_idx: int) -> "NemotronHPuzzleConfig":
        """A copy of this config with layer ``layer_idx``'s fields in place of the global ones."""
        layer = copy.deepcopy(self)
        for key, value in (self.block_configs[layer_idx] if self.block_configs else {}).items():
            if key != "block_type":
                setattr(layer, key, value)
        return layer


@strict
class NemotronHElasticConfig(NemotronHPuzzleConfig):
    model_type = "nemotron_h_elastic"
    _extension = True


__all__ = ["NemotronHElasticConfig", "NemotronHPuzzleConfig"]
