"""The chunked SSD scan and the decode step against the naive token-by-token recurrence."""

import pytest
import torch

from elastic.slicer.nn.ssd import ssd_chunked, ssd_naive, ssd_step


def inputs(b=2, l=13, h=6, p=3, g=2, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("l,chunk", [(13, 4), (16, 4), (1, 4), (3, 8), (32, 8), (7, 1)])
@pytest.mark.parametrize("g", [1, 2, 6])
def test_chunked_equals_naive(l, chunk, g):
    x, dt, A, B, C, D = inputs(l=l, g=g)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_continues_from_initial_state():
    x, dt, A, B, C, D = inputs(l=20)
    y_full, s_full = ssd_naive(x, dt, A, B, C, D)
    _, s_mid = ssd_chunked(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], 4, D)
    y_rest, s_end = ssd_chunked(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], 4, D, initial_state=s_mid)
    torch.testing.assert_close(y_rest, y_full[:, 9:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_end, s_full, rtol=1e-5, atol=1e-5)


def test_step_sequence_equals_chunked():
    x, dt, A, B, C, D = inputs(l=10)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 4, D)
    state = torch.zeros(2, 6, 3, 4)
    ys = []
    for t in range(10):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)


def test_heads_use_their_own_group():
    """Changing group 1's B must leave the heads of group 0 untouched (contiguous head blocks)."""
    x, dt, A, B, C, D = inputs(g=2, h=6)
    y0, _ = ssd_chunked(x, dt, A, B, C, 4, D)
    B2 = B.clone()
    B2[:, :, 1] += 1.0
    y1, _ = ssd_chunked(x, dt, A, B2, C, 4, D)
    torch.testing.assert_close(y1[:, :, :3], y0[:, :, :3])
    assert not torch.allclose(y1[:, :, 3:], y0[:, :, 3:])
