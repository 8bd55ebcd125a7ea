"""The Mamba-2 state-space recurrence (SSD), three ways that must agree.

- :func:`ssd_naive`: the definition, one token at a time (the oracle for the other two);
- :func:`ssd_chunked`: the chunked "state space duality" form used for prefill: quadratic inside a
  chunk, linear across chunks, no Python loop over the sequence (so it exports to ONNX);
- :func:`ssd_step`: one decode step that updates the recurrent state in place of a scan.

Notation (Mamba-2 paper): b batch, l sequence, h heads, p head channels, g groups, n state size.
Head h reads the B/C of group h // (h_total / g). ``dt`` arrives already passed through softplus
and clamped; ``A`` is negative (A = -exp(A_log)). Everything is computed in float32.

Recurrence, per head:  S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T ;  y_t = S_t C_t + D x_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): each group's B or C repeated for the heads of that group."""
    return t.repeat_interleave(h // t.shape[-2], dim=-2)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence.

    Args:
        state: (b, h, p, n) float32, the state before this token.
        x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or None.

    Returns:
        (y, new_state): y (b, h, p) float32, new_state (b, h, p, n) float32.
    """
    h = x.shape[1]
    x, dt, B, C = x.float(), dt.float(), _heads(B.float(), h), _heads(C.float(), h)  # B, C: (b, h, n)
    decay = torch.exp(dt * A.float())[..., None, None]  # (b, h, 1, 1)
    new_state = state * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (b, h, p, n)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + D.float()[:, None] * x
    return y, new_state


def ssd_naive(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence. x (b, l, h, p), dt (b, l, h), B/C (b, l, g, n).

    Returns:
        (y (b, l, h, p), final_state (b, h, p, n)), both float32.
    """
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summing masked copies (instead of subtracting two cumulative sums) keeps small differences
    exact when the cumulative sums are large.
    """
    T = a.shape[-1]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return s.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
    D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan; same contract as :func:`ssd_naive`.

    The sequence is zero-padded to a multiple of ``chunk_size``: a padded step has dt = 0, so it
    neither decays nor feeds the state, and the final state is that of the last real token.
    """
    b, l, h, p = x.shape
    pad = (chunk_size - l % chunk_size) % chunk_size
    xf, dtf = x.float(), dt.float()
    Bh, Ch = _heads(B.float(), h), _heads(C.float(), h)  # (b, l, h, n)
    # padded even when pad == 0: no branch on the length, so one exported (ONNX) graph serves every length
    xf, dtf = F.pad(xf, (0, 0, 0, 0, 0, pad)), F.pad(dtf, (0, 0, 0, pad))
    Bh, Ch = F.pad(Bh, (0, 0, 0, 0, 0, pad)), F.pad(Ch, (0, 0, 0, 0, 0, pad))
    c, T = (l + pad) // chunk_size, chunk_size
    n = Bh.shape[-1]
    xdt = (xf * dtf[..., None]).reshape(b, c, T, h, p)  # discretised input, (b, c, T, h, p)
    Bh, Ch = Bh.reshape(b, c, T, h, n), Ch.reshape(b, c, T, h, n)
    a = (dtf * A.float()).reshape(b, c, T, h).permute(0, 3, 1, 2)  # log-decay per step, (b, h, c, T)
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, T)

    # 1. inside each chunk: attention-like form with the decay matrix L, (b, h, c, T, T)
    L = torch.exp(_segsum(a))
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * L
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. the state each chunk adds by its end, (b, c, h, p, n)
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # decay from step s to the end of its chunk
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, xdt)

    # 3. across chunks: the state entering each chunk, from the initial state and earlier chunks
    init = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = torch.cat([init[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    across = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzs,bshpn->bzhpn", across, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. what the entering state contributes to each output, decayed to that step
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, c * T, h, p)[:, :l]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y, final_state
