"""``NemotronHPuzzleConfig``: a Nemotron-H config whose layers may differ in size.

Shipped by elastic next to a heterogeneous checkpoint and loaded by transformers (>= 5.6) with
``trust_remote_code=True``. The global fields hold the first layer of each kind's sizes;
``block_configs`` holds one dict per layer, ``block_type`` plus that layer's overriding fields:

    {"block_type": "mamba", "mamba_num_heads": 64, "mamba_head_dim": 80}
    {"block_type": "attention", "num_attention_heads": 32, "num_key_value_heads": 8}
    {"block_type": "mlp", "intermediate_size": 15360}

Example:
    >>> config.get_nemotron_h_config_for_layer(3).intermediate_size   # vLLM calls this too
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


@strict  # re-applied so that validate_block_configs runs (transformers' configs do the same)
class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"

    # one dict per layer: "block_type" plus the fields that override the global ones; None = homogeneous
    block_configs: list[dict] | None = None

    def validate_block_configs(self):
        """Part of the ``@strict`` validation: one well-typed entry per layer, all problems at once."""
        if self.block_configs is None:
            return
        kinds = self.layers_block_type
        if len(self.block_configs) != len(kinds):
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for {len(kinds)} layers")
        problems = []
        for i, (block, kind) in enumerate(zip(self.block_configs, kinds)):
            btype = block.get("block_type")
            if btype is not None and _CANONICAL.get(btype) != _CANONICAL.get(kind, kind):
                problems.append(f"block_configs[{i}].block_type is {btype!r} but layer {i} is {kind!r}")
            problems += [f"block_configs[{i}].{k} must be a positive integer, found {v!r}"
                         for k, v in block.items()
                         if k != "block_type" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0)]
        if problems:
            raise ValueError("; ".join(problems))

    def get_nemotron_h_config_for_layer(self, layer_idx: int) -> "NemotronHPuzzleConfig":
        """A copy of this config with layer ``layer_idx``'s fields in place of the global ones."""
        layer = copy.deepcopy(self)
        for key, value in (self.block_configs[layer_idx] if self.block_configs else {}).items():
            if key != "block_type":
                setattr(layer, key, value)
        return layer


__all__ = ["NemotronHPuzzleConfig"]
