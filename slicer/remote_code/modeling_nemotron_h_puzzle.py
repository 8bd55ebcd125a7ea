"""``NemotronHPuzzleForCausalLM`` and ``NemotronHElasticForCausalLM``: transformers' Nemotron-H with
per-layer sizes (NVIDIA's Puzzle form and elastic's extension; see the config file).

Shipped by elastic next to a heterogeneous checkpoint and loaded by transformers (>= 5.6) with
``trust_remote_code=True``. Every layer is transformers' own ``NemotronHBlock``, built from
``config.get_nemotron_h_config_for_layer(i)`` so that each mixer gets its own sizes; the forward
passes, the cache and generation are transformers' unchanged (the cache allocates each layer's
state lazily, from the tensors it is given, so per-layer sizes need nothing there).

Weights keep the on-disk names (``backbone.layers.N.mixer...``, ``lm_head.weight``): the base
model sits under ``backbone`` because transformers applies its ``backbone.`` -> ``model.`` renaming
to built-in classes only, never to remote code.
"""

from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHBlock,
    NemotronHForCausalLM,
    NemotronHMamba2Mixer,
    NemotronHModel,
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


def _block(config: NemotronHPuzzleConfig, layer_idx: int) -> NemotronHBlock:
    block = NemotronHBlock(config.get_nemotron_h_config_for_layer(layer_idx), layer_idx=layer_idx)
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
    "NemotronHPuzzleForCausalLM",
    "NemotronHPuzzleModel",
    "NemotronHPuzzlePreTrainedModel",
]
