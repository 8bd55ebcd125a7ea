"""Optional CUDA kernels (mamba-ssm, causal-conv1d), detected once, used only on CUDA tensors.

The pure-PyTorch path in ``ssd.py`` always works; these are a speed-up on GPU machines where the
packages are installed (``pip install 'elastic[kernels]'``, needs nvcc). Never install them on a
CPU-only machine: transformers imports them unconditionally when present (DESIGN.md section 3).

Tests flip :data:`ENABLED` (or set ``ELASTIC_KERNELS=0``) to force the reference path.
"""

from __future__ import annotations

import functools
import os

ENABLED = os.environ.get("ELASTIC_KERNELS", "1") != "0"


@functools.cache
def _mamba_ssm():
    """(mamba_chunk_scan_combined, selective_state_update) or None when mamba-ssm is absent."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a CUDA-less build failing at import
        return None
    return mamba_chunk_scan_combined, selective_state_update


@functools.cache
def _causal_conv1d():
    """(causal_conv1d_fn, causal_conv1d_update) or None."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        return None
    return causal_conv1d_fn, causal_conv1d_update


def ssm_kernels(tensor):
    """The mamba-ssm kernels when enabled, available and ``tensor`` lives on CUDA; else None."""
    if not (ENABLED and tensor.is_cuda):
        return None
    return _mamba_ssm()


def conv_kernels(tensor):
    """The causal-conv1d kernels when enabled, available and ``tensor`` lives on CUDA; else None."""
    if not (ENABLED and tensor.is_cuda):
        return None
    return _causal_conv1d()


def available() -> dict[str, bool]:
    """Which kernel packages import here (for ``elastic inspect``-style reports)."""
    return {"mamba_ssm": _mamba_ssm() is not None, "causal_conv1d": _causal_conv1d() is not None}
