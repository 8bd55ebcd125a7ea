"""Measure an elastic checkpoint's size curve (``elastic eval --curve``; issue 25 item 4): every
trained budget and every in-between size asked for, sliced as ``elastic slice --budget`` slices it,
then held-out perplexity of each distinct architecture (``quantize.evaluate.perplexity``, the
function ``elastic eval`` calls). The result is a :class:`~elastic.slicer.formats.size_curve.SizeCurve`;
writing it is the caller's explicit step (``size_curve.write_curve``).

Example:
    >>> curve, skipped = measure_curve("slicer/demo_checkpoint", max_windows=64)
    >>> [(p.name, p.parameters, p.perplexity) for p in curve.points], curve.outside()
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from elastic.profiles.progress import Progress
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.size_curve import CurvePoint, SizeCurve, fingerprint

SHARES = tuple(range(40, 101, 5))  # the in-between sizes measured by default, in % of the parent


def curve_sizes(budget_names: Iterable[str], shares: Iterable[int] = SHARES) -> list[str]:
    """The trained budgets, then every share (``"60%"``) that is not one of them."""
    names = list(budget_names)
    return names + [f"{s}%" for s in shares if f"{s}%" not in names]


def measure_curve(checkpoint, sizes: Iterable[str] | None = None, *, seq_len: int | None = None,
                  max_windows: int | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                  work_dir: str | Path | None = None,
                  progress: Progress | None = None) -> tuple[SizeCurve, list[dict]]:
    """Perplexity against parameters for the sizes of an elastic checkpoint.

    Args:
        checkpoint: an elastic checkpoint directory with weights (or an opened Checkpoint).
        sizes: budget names and sizes (``"60%"``, ``"7.5B"``, ``"6GiB"``); default: the trained
            budgets and every 5% from 40% to 100% (:func:`curve_sizes`).
        seq_len, max_windows, max_tokens, batch_size: as ``elastic eval`` (default: its own, all held-out windows).
        work_dir: where each slice is written while it is measured (one at a time; default: the
            system's temporary directory).
        progress: ``progress("curve", architectures measured, architectures)``.

    Returns:
        the curve (one point per distinct architecture, with every size that resolved to it), and
        the sizes no architecture reaches (``{"size", "error"}``): reported, not fatal.

    Raises:
        ConfigError: not an elastic checkpoint; no size could be resolved.
    """
    from elastic.slicer.formats.elastic_format import ElasticConfig, read_router, resolve_budget
    from elastic.slicer.quantize.evaluate import BATCH, SEQ_LEN, perplexity
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint, require_weights=True)
    if not ckpt.is_elastic:
        raise ConfigError("a size curve needs an elastic checkpoint (elastic_config.json): a dense one has one size",
                          path=str(ckpt.root))
    parent = ckpt.arch
    ec = ElasticConfig.read(ckpt.root, parent)
    weights = read_router(ckpt.root, ec)
    trained = {b.name for b in ec.budgets}
    groups: dict[str, list] = {}  # spec key -> [spec, source, sizes]
    skipped = []
    for size in sizes if sizes is not None else curve_sizes(b.name for b in ec.budgets):
        try:
            spec, source = resolve_budget(ckpt.root, ec, parent, size, weights)
        except ConfigError as e:  # a size no architecture reaches (UnreachableBudget names the nearest)
            skipped.append({"size": size, "error": e.message})
            continue
        key = json.dumps(spec.to_json(parent), sort_keys=True)
        groups.setdefault(key, [spec, source, []])[2].append(size)
    if not groups:
        raise ConfigError("no size of the curve resolves to an architecture", problems=[s["error"] for s in skipped])
    points, evaluation = [], {}
    settings = dict(seq_len=seq_len or SEQ_LEN, max_windows=max_windows, max_tokens=max_tokens, batch_size=batch_size or BATCH)
    with tempfile.TemporaryDirectory(prefix="elastic-curve-", dir=work_dir) as tmp:
        for k, (spec, source, names) in enumerate(groups.values()):
            if progress:
                progress("curve", k, len(groups))
            names = sorted(names, key=lambda n: n not in trained)  # a trained budget's name first
            out = Path(tmp) / f"size{k}"
            result = slice_checkpoint(ckpt, out, budget=names[0], resolved=(spec, source))
            r = perplexity(out, **settings)
            points.append(CurvePoint(tuple(names), names[0] in trained or spec.is_full(parent), result.parameters,
                                     round(r.perplexity, 6), round(r.nll, 6), spec.to_json(parent), source))
            evaluation = {"text": r.corpus, "seq_len": r.seq_len, "windows": r.windows, "tokens": r.tokens,
                          "precision": r.precision, "model": "the reference PyTorch model (elastic eval)"}
            _remove(out)
    if progress:
        progress("curve", len(groups), len(groups))
    curve = SizeCurve(fingerprint(ckpt.root, ec.router_file), evaluation,
                      tuple(sorted(points, key=lambda p: -p.parameters)))
    return curve, skipped


def _remove(path: Path) -> None:
    """Drop one measured slice at once (a large checkpoint's slices are not kept side by side)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
