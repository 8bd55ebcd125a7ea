"""The modeling code that lets transformers load a checkpoint with per-layer sizes.

A slice is written in one of three forms (``Arch.config_form``, docs/runtime-facts.md):

- ``nemotron_h``: transformers' own ``NemotronHForCausalLM``; no code here is needed.
- ``nemotron_h_puzzle``: NVIDIA's Puzzle form (per-layer MLP widths in ``block_configs``,
  Mamba and attention sizes global), architecture ``NemotronHPuzzleForCausalLM``. vLLM routes it
  to its nemotron_h model; it and transformers need the config class, so the directory carries
  ``FILES`` and the ``auto_map`` below (load with ``trust_remote_code=True``).
- ``nemotron_h_elastic``: elastic's extension (per-layer Mamba and attention sizes as well),
  architecture ``NemotronHElasticForCausalLM``, which only these files read; a distinct name so no
  runtime mistakes it for a model it would build at the wrong sizes.

No torch or transformers import here: the two files are data for this package.

Example:
    >>> config = arch.to_config()        # identity(arch.config_form()) applied
    >>> for f in FILES:
    ...     shutil.copy(f, out / f.name)
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# the files to copy, as they are, into a checkpoint directory whose config is not the stock form
FILES: tuple[Path, ...] = (
    _HERE / "configuration_nemotron_h_puzzle.py",
    _HERE / "modeling_nemotron_h_puzzle.py",
)

# model_type -> what config.json says about the model's identity
_IDENTITY = {
    "nemotron_h": {"architectures": ["NemotronHForCausalLM"]},
    "nemotron_h_puzzle": {
        "architectures": ["NemotronHPuzzleForCausalLM"],
        "auto_map": {  # as NVIDIA's Puzzle checkpoints name them (docs/runtime-facts.md section 1)
            "AutoConfig": "configuration_nemotron_h_puzzle.NemotronHPuzzleConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h_puzzle.NemotronHPuzzleForCausalLM",
        },
    },
    "nemotron_h_elastic": {
        "architectures": ["NemotronHElasticForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_nemotron_h_puzzle.NemotronHElasticConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h_puzzle.NemotronHElasticForCausalLM",
        },
    },
}


def identity(form: str) -> dict:
    """``model_type``, ``architectures`` and (when code is needed) ``auto_map`` of a config form."""
    entry = _IDENTITY[form]
    return {"model_type": form, "architectures": list(entry["architectures"]),
            **({"auto_map": dict(entry["auto_map"])} if "auto_map" in entry else {})}


def needs_code(config: dict) -> bool:
    """True when ``config`` names a class that only ``FILES`` provide."""
    return "auto_map" in config
