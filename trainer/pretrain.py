"""Plain training of one fixed model: a dense parent from scratch (next-token cross-entropy), or one
fixed nested model distilled from a teacher (the baselines the elastic run is compared with)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from elastic.profiles.progress import Progress
from elastic.slicer.nn.masked import masked_forward
from elastic.slicer.nn.model import NemotronH
from elastic.slicer.formats.spec import SliceSpec

from .data import TokenDataset


def fit(model: NemotronH, ds: TokenDataset, steps: int, *, batch_size: int = 8, context: int = 128,
        lr: float = 1e-3, warmup: int = 20, seed: int = 0, teacher: NemotronH | None = None,
        spec: SliceSpec | None = None, progress: Progress | None = None) -> dict:
    """Train ``model`` in place (or only the nested model ``spec`` of it) for ``steps`` steps.

    With a ``teacher``: forward KL from the teacher's logits; otherwise cross-entropy on the data.
    ``progress("pretrain", step, steps, loss=...)`` after each step ("distill" with a teacher).

    Returns:
        ``{"steps", "tokens", "losses"}``.
    """
    from .train import forward_kl

    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    g = torch.Generator().manual_seed(seed)
    losses = []
    stage = "pretrain" if teacher is None else "distill"
    for step in range(steps):
        x, y = ds.batch(g, batch_size, context)
        logits = model(x) if spec is None else masked_forward(model, spec, x)
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                t = teacher(x)
            loss = forward_kl(t, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(stage, step + 1, steps, loss=losses[-1])
    return {"steps": steps, "tokens": steps * batch_size * context, "losses": losses}
