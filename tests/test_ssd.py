"""The chunked SSD scan, the decode step and the token-by-token loop against the Mamba-2 recurrence
written out here from its definition (DESIGN.md section 3), in float64 with explicit loops."""

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


def recurrence(x, dt, A, B, C, D, state=None):
    """Per head h of group g = h // (heads / groups), token by token:
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T  (p x n),   y_t = S_t C_t + D_h * x_t.
    Returns (y (b, l, h, p), S_l (b, h, p, n)) in float64."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    S = torch.zeros(b, h, p, n, dtype=torch.float64) if state is None else state.double().clone()
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    for t in range(l):
        for head in range(h):
            grp = head // (h // g)
            for i in range(b):
                S[i, head] = (torch.exp(dt[i, t, head] * A[head]) * S[i, head]
                              + dt[i, t, head] * torch.outer(x[i, t, head], B[i, t, grp]))
                y[i, t, head] = S[i, head] @ C[i, t, grp] + D[head] * x[i, t, head]
    return y, S


def close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("l,chunk", [(13, 4), (16, 4), (1, 4), (3, 8), (32, 8), (7, 1)])
@pytest.mark.parametrize("g", [1, 2, 6])
def test_chunked_and_naive_equal_the_recurrence(l, chunk, g):
    x, dt, A, B, C, D = inputs(l=l, g=g)
    y_ref, s_ref = recurrence(x, dt, A, B, C, D)
    assert y_ref.abs().max() > 1.0  # every term is large enough to matter
    for y, s in (ssd_chunked(x, dt, A, B, C, chunk, D), ssd_naive(x, dt, A, B, C, D)):
        close(y, y_ref)
        close(s, s_ref)


def test_chunked_continues_from_initial_state():
    x, dt, A, B, C, D = inputs(l=20)
    y_full, s_full = recurrence(x, dt, A, B, C, D)
    _, s_mid = ssd_chunked(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], 4, D)
    close(s_mid, recurrence(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], D)[1])
    y_rest, s_end = ssd_chunked(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], 4, D, initial_state=s_mid)
    close(y_rest, y_full[:, 9:])
    close(s_end, s_full)


def test_step_sequence_equals_the_recurrence():
    x, dt, A, B, C, D = inputs(l=10)
    y_ref, s_ref = recurrence(x, dt, A, B, C, D)
    state = torch.zeros(2, 6, 3, 4)
    ys = []
    for t in range(10):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    close(torch.stack(ys, 1), y_ref)
    close(state, s_ref)


def test_heads_use_their_own_group():
    """Changing group 1's B must leave the heads of group 0 untouched (contiguous head blocks)."""
    x, dt, A, B, C, D = inputs(g=2, h=6)
    y0, _ = ssd_chunked(x, dt, A, B, C, 4, D)
    B2 = B.clone()
    B2[:, :, 1] += 1.0
    y1, _ = ssd_chunked(x, dt, A, B2, C, 4, D)
    torch.testing.assert_close(y1[:, :, :3], y0[:, :, :3])
    assert not torch.allclose(y1[:, :, 3:], y0[:, :, 3:])
