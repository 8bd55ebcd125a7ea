"""The remote code that lets transformers load a heterogeneous (per-layer sizes) checkpoint.

A slice whose layers of one kind differ in size is written as a ``nemotron_h`` config plus
``block_configs`` (see ``Arch.to_config``). No stock class reads ``block_configs``, so the output
directory also carries the two files in ``FILES`` and a config rewritten by :func:`puzzle_config`;
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` then builds every layer at
its own size. vLLM and sglang know the same architecture name and ``block_configs`` (for per-layer
FFN widths; they size Mamba state from the global fields: DESIGN.md section 3).

No torch or transformers import here: the two files are data for this package.

Example:
    >>> config = puzzle_config(arch.to_config())
    >>> for f in FILES:
    ...     shutil.copy(f, out / f.name)
"""

from __future__ import annotations

import copy
from pathlib import Path

_HERE = Path(__file__).resolve().parent

# the files to copy, as they are, into a checkpoint directory that uses puzzle_config()
FILES: tuple[Path, ...] = (
    _HERE / "configuration_nemotron_h_puzzle.py",
    _HERE / "modeling_nemotron_h_puzzle.py",
)

ARCHITECTURE = "NemotronHPuzzleForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_h_puzzle.NemotronHPuzzleConfig",
    "AutoModelForCausalLM": "modeling_nemotron_h_puzzle.NemotronHPuzzleForCausalLM",
}


def puzzle_config(config: dict) -> dict:
    """A copy of a ``nemotron_h`` config dict in the remote-code form.

    Args:
        config: as written by ``Arch.to_config()`` (with or without ``block_configs``).

    Returns:
        The same keys with ``model_type`` "nemotron_h_puzzle", ``architectures``
        ["NemotronHPuzzleForCausalLM"] and the ``auto_map`` that points transformers at ``FILES``.
    """
    out = copy.deepcopy(config)
    out["model_type"] = "nemotron_h_puzzle"
    out["architectures"] = [ARCHITECTURE]
    out["auto_map"] = dict(AUTO_MAP)
    return out
