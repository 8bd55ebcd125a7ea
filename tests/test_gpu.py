"""CUDA paths: the reference model on a GPU, and the mamba-ssm kernels where installed."""

import importlib.util

import pytest
import torch

from elastic.slicer.nn import kernels
from elastic.slicer.nn.model import load_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_mamba_ssm_not_importable_without_cuda():
    """transformers imports mamba_ssm whenever present and then fails on CPU (DESIGN.md section 3)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have mamba-ssm")
    assert importlib.util.find_spec("mamba_ssm") is None
    assert kernels.available() == {"mamba_ssm": False, "causal_conv1d": False}


@pytest.mark.gpu
@cuda
def test_cuda_matches_cpu(hf_ckpt, monkeypatch):
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    cpu = load_model(hf_ckpt[0])
    with torch.no_grad():
        ref = cpu(ids)
    for enabled in (False, True):  # pure PyTorch on CUDA, then the kernels when installed
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        gpu = load_model(hf_ckpt[0], device="cuda")
        with torch.no_grad():
            got = gpu(ids.cuda()).cpu()
            cache = gpu.new_cache()
            steps = [gpu(ids[:, :9].cuda(), cache=cache)] + [gpu(ids[:, t:t + 1].cuda(), cache=cache) for t in range(9, 21)]
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)  # TF32/kernels differ in rounding
        torch.testing.assert_close(torch.cat(steps, 1).cpu(), ref, rtol=1e-3, atol=1e-3)
