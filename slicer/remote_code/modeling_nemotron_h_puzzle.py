"""``NemotronHPuzzleForCausalLM`` and ``NemotronHElasticForCausalLM``: transformers' Nemotron-H with
per-layer sizes (NVIDIA's Puzzle form and elastic's extension; see the config file).

Shipped by elastic next to a heterogeneous checkpoint and loaded by transformers (>= 5.6) with
``trust_remote_code=True``. Every layer is transformers' own ``NemotronHBlock``, built from
``config.get_nemotron_h_config_for_layer(i)`` so that each mixer gets its own sizes; the forward
passes, the cache and generation are transformers' unchanged (the cache allocates each layer's
state lazily, from the tensors it is given, so per-layer sizes need nothing there).

Weights keep the on-disk names (``backbone.layers.N.mixer...``, ``lm_head.weight``): the base
model sits under ``backbone`` because transformers applies its ``backbone.`` -> ``model.`` renaming
to built-in classes only, never to remote code. For the same reason it does not merge a MoE layer's
per-expert tensors (``mixer.experts.E.up_proj.weight``) into its 3-D expert parameters, so MoE
layers here hold one module per expert (:class:`NemotronHPuzzleExperts`), as NVIDIA stores them.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHBlock,
    NemotronHForCausalLM,
    NemotronHMamba2Mixer,
    NemotronHModel,
    NemotronHMoE,
    NemotronHPreTrainedModel,
    NemotronHRMSNorm,
)

from .configuration_nemotron_h_puzzle import NemotronHElasticConfig, NemotronHPuzzleConfig


class NemotronHPuzzlePreTrainedModel(NemotronHPreTrainedModel):
    config_class = NemotronHPuzzleConfig
    base_model_prefix = "backbone"

    def _init_weights(self, module):
        # The stock init sizes A_log and dt_bias from the global mamba_num_heads; let it see the
        # layer's own config instead (it only runs for tensors the checkpoint did not provide).
        if isinstance(module, NemotronHMamba2Mixer):
            config = self.config
            self.config = config.get_nemotron_h_config_for_layer(module.layer_idx)
            try:
                super()._init_weights(module)
            finally:
                self.config = config
        else:
            super()._init_weights(module)


class NemotronHPuzzleExpert(nn.Module):
    """One routed expert: ``down_proj(act(up_proj(x)))``, no gate."""

    def __init__(self, config, width: int):
        super().__init__()
        self.up_proj = nn.Linear(width, config.moe_intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.moe_intermediate_size, width, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.mlp_hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class NemotronHPuzzleExperts(nn.ModuleList):
    """A MoE layer's routed experts, one module each (``experts.{e}.up_proj.weight``), called as the
    stock ``NemotronHExperts`` is: ``(hidden_states (T, width), top_k_index (T, k), top_k_weights (T, k))``."""

    def __init__(self, config):
        width = config.moe_latent_size if config.moe_latent_size is not None else config.hidden_size
        super().__init__(NemotronHPuzzleExpert(config, width) for _ in range(config.n_routed_experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)  # weighted sum in the weights' float32
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            out.index_add_(0, token, self[e](hidden_states[token]) * top_k_weights[token, slot, None])
        return out.to(hidden_states.dtype)


def _block(config: NemotronHPuzzleConfig, layer_idx: int) -> NemotronHBlock:
    layer_config = config.get_nemotron_h_config_for_layer(layer_idx)
    block = NemotronHBlock(layer_config, layer_idx=layer_idx)
    if isinstance(block.mixer, NemotronHMoE):
        block.mixer.experts = NemotronHPuzzleExperts(layer_config)
    # Sizes are read once, in __init__. From here on every layer shares the model's config, so that
    # later switches (set_attn_implementation) reach the attention layers too.
    block.config = block.mixer.config = config
    return block


class NemotronHPuzzleModel(NemotronHPuzzlePreTrainedModel, NemotronHModel):
    def __init__(self, config: NemotronHPuzzleConfig):
        # skip NemotronHModel.__init__, which would size every layer from the global fields
        super(NemotronHModel, self).__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()


class NemotronHPuzzleForCausalLM(NemotronHPuzzlePreTrainedModel, NemotronHForCausalLM):
    def __init__(self, config: NemotronHPuzzleConfig):
        super(NemotronHForCausalLM, self).__init__(config)  # skip the stock __init__ (it builds NemotronHModel)
        self.backbone = NemotronHPuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def model(self) -> NemotronHPuzzleModel:
        """The base model under the name that NemotronHForCausalLM.forward uses."""
        return self.backbone


class NemotronHElasticForCausalLM(NemotronHPuzzleForCausalLM):
    """The same model for elastic's extension form (per-layer Mamba and attention sizes)."""

    config_class = NemotronHElasticConfig


__all__ = [
    "NemotronHElasticConfig",
    "NemotronHElasticForCausalLM",
    "NemotronHPuzzleConfig",
    "NemotronHPuzzleExpert",
    "NemotronHPuzzleExperts",
    "NemotronHPuzzleForCausalLM",
    "NemotronHPuzzleModel",
    "NemotronHPuzzlePreTrainedModel",
]
