"""What a checkpoint holds: the facts behind ``elastic inspect``. No torch import."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from elastic.slicer.formats.arch import KINDS
from elastic.slicer.storage.reader import ELASTIC_CONFIG_NAME, Checkpoint
from elastic.slicer.formats.elastic_format import ElasticConfig, read_router, resolve_budget
from elastic.slicer.errors import CheckpointError, ConfigError, Hint

DEMO_CHECKPOINT = Path(__file__).parents[1] / "demo_checkpoint"
# How every output counts parameters (``Arch.param_counts``): the elements of every tensor the checkpoint
# stores, as the Hugging Face Hub's safetensors count does. That includes each MoE router's
# ``e_score_correction_bias``, which transformers holds as a buffer, so its ``num_parameters()`` is lower by
# those (one value per routed expert per MoE layer); it is the memory the weights take either way.
PARAMETER_CONVENTION = "safetensors count, incl. e_score_correction_bias buffers"


def default_checkpoint() -> Path:
    """Where a command looks when no ``--checkpoint`` is given (DESIGN.md section 1):
    ``$ELASTIC_CHECKPOINT``, the current directory if it is an elastic checkpoint, the bundled demo."""
    env = os.environ.get("ELASTIC_CHECKPOINT")
    if env:
        return Path(env)
    if (Path.cwd() / ELASTIC_CONFIG_NAME).is_file():
        return Path.cwd()
    if not (DEMO_CHECKPOINT / "config.json").is_file():
        raise CheckpointError("the bundled demo checkpoint is missing from this installation",
                              hint=Hint("checkpoint", "give a checkpoint directory"),
                              path=str(DEMO_CHECKPOINT))
    return DEMO_CHECKPOINT


def describe(path: str | Path | None = None) -> dict[str, Any]:
    """Layer pattern, sizes, parameters per layer kind and in total, dtype, bytes on disk.

    Works from config.json alone when the weights are absent (``weights_present`` is then false
    and parameter counts come from the config).

    Returns:
        a JSON-ready dict with the stable keys ``path``, ``layer_pattern``, ``parameters``
        (``total`` and ``active`` plus one entry per layer kind, embeddings, norm_f, lm_head, counted as
        ``parameter_convention`` says: :data:`PARAMETER_CONVENTION`), ``dtype``,
        ``bytes_on_disk``, ``elastic``; and more.
    """
    root = Path(path) if path is not None else default_checkpoint()
    ckpt = Checkpoint.open(root)
    arch = ckpt.arch
    params = arch.param_counts()
    sizes: dict[str, Any] = {"vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size}
    kinds = {k: sum(1 for layer in arch.layers if layer.kind == k) for k in KINDS}
    if kinds["mamba"]:
        sizes.update(n_groups=arch.n_groups, ssm_state_size=arch.ssm_state_size, conv_kernel=arch.conv_kernel)
    if kinds["attention"]:
        sizes["head_dim"] = arch.head_dim
    for kind in KINDS:
        values = sorted({tuple(layer.sizes().items()) for layer in arch.layers if layer.kind == kind})
        if len(values) == 1:
            sizes.update(dict(values[0]))
        elif values:  # heterogeneous: the range of each field
            for field in dict(values[0]):
                vs = [dict(v)[field] for v in values]
                sizes[field] = {"min": min(vs), "max": max(vs)}
    if kinds["moe"]:  # routing, one setting for every MoE layer
        sizes.update(num_experts_per_tok=arch.num_experts_per_tok, n_group=arch.n_group, topk_group=arch.topk_group)
        if arch.moe_latent_size:
            sizes["moe_latent_size"] = arch.moe_latent_size
    budgets = []
    if ckpt.is_elastic:
        ec = ElasticConfig.read(ckpt.root, arch)
        weights = read_router(ckpt.root, ec)
        for b in ec.budgets:
            try:
                spec, source = resolve_budget(ckpt.root, ec, arch, b.name, weights=weights)
            except ConfigError as e:  # e.g. a router that misses this budget: shown, not fatal here
                budgets.append({"name": b.name, "target_parameters": b.target_parameters, "error": e.message})
                continue
            child = spec.child_arch(arch)
            counts = child.param_counts()
            budgets.append({
                "name": b.name,
                "parameters": counts["total"],
                "active_parameters": counts["active"],  # per token: total less the routed experts it skips
                "target_parameters": b.target_parameters,
                "layer_pattern": child.layer_pattern,
                "hidden_size": child.hidden_size,
                "homogeneous": child.is_homogeneous(),
                "config_form": child.config_form(),  # nemotron_h | nemotron_h_puzzle | nemotron_h_elastic
                "resolved_by": source,
            })
    return {
        "path": str(ckpt.root.resolve()),
        "layer_pattern": arch.layer_pattern,
        "num_hidden_layers": arch.num_hidden_layers,
        "layers": {k: n for k, n in kinds.items() if n},
        "homogeneous": arch.is_homogeneous(),
        "sizes": sizes,
        "parameters": params,
        "parameter_convention": PARAMETER_CONVENTION,
        "dtype": ckpt.dtype,
        "weights_present": ckpt.has_weights,
        # what the shards hold: equals parameters.total unless they carry extra tensors (mtp.*)
        "parameters_stored": sum(t.numel for t in ckpt.tensors.values()) if ckpt.has_weights else None,
        "bytes_on_disk": ckpt.bytes_on_disk,
        "weights_bytes": ckpt.weights_bytes,
        "shards": len(ckpt.weight_files),
        "elastic": ckpt.is_elastic,
        "budgets": budgets,
    }
