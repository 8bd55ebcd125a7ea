"""A budget run on the resident parent's tensors: the nested model built from views, no weight copies.

``budget_model(parent, spec)`` returns a :class:`NemotronH` of the child's architecture whose
weights are *views* of the parent's: a kept prefix (``W[:f, :d]``) is a strided view of the
parent's storage. A weight matrix whose rule keeps several ranges on an axis (Mamba ``in_proj``
rows ``[z[kept] | x[kept] | B | C | dt[kept]]``, ``out_proj`` columns, attention heads kept inside
each KV group) is not one view: :class:`RangeLinear` holds one view per (row range, column range)
block and computes ``x W[rows, cols]^T`` block by block, so it is not copied either. Only small
per-channel vectors (``A_log``, ``D``, ``dt_bias``, gated-norm weights, the depthwise conv's taps,
the MoE gate's rows) are gathered, when their kept entries are not one range:
:func:`storage_report` counts those bytes.

The child's forward, cache and decode step are the reference model's own, so the budget runs
through the one greedy loop (``TorchBackend``) like a sliced child, and computes its logits
(block sums of a split column axis differ from one dot product by float rounding only).

Example:
    >>> resident = ResidentParent("./elastic-ckpt")
    >>> r = resident.generate("50%", "Hello", 16)          # == smoke_test(slice of 50%, "Hello", 16)
    >>> storage_report(resident.parent, resident.model("50%"))["copied_bytes"]   # small vectors only
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elastic.slicer.errors import ConfigError, ElasticError, Hint
from elastic.slicer.formats.rules import Ranges, length, tensor_rules
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.nn.masked import narrow
from elastic.slicer.nn.model import FakeQuantLinear, NemotronH, TorchBackend, load_model

FULL = "100%"  # the name a parent without elastic_config.json serves itself under


class RangeLinear(nn.Module):
    """``x W[rows, cols]^T (+ b[rows])`` from views of the parent's ``W``, one matmul per block.

    ``rows`` / ``cols`` are the kept ranges of the parent's output / input axis (sorted, as the
    slicer keeps them): the child's input is their concatenation, and so is its output.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: Ranges, cols: Ranges):
        super().__init__()
        self.rows, self.in_features, self.out_features = len(rows), length(cols), length(rows)
        starts = [0]
        for a, b in cols:
            starts.append(starts[-1] + b - a)
        self.col_slices = [(starts[j], starts[j + 1]) for j in range(len(cols))]  # child input columns
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):  # non-persistent buffers: listed by named_buffers, no copy
                self.register_buffer(f"w{i}_{j}", weight[r0:r1, c0:c1], persistent=False)
            self.register_buffer(f"b{i}", None if bias is None else bias[r0:r1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x[..., a:b] for a, b in self.col_slices]  # views of the input, (..., cols_j)
        outs = []
        for i in range(self.rows):
            y = F.linear(xs[0], getattr(self, f"w{i}_0"), getattr(self, f"b{i}"))
            for j in range(1, len(xs)):
                y = y + F.linear(xs[j], getattr(self, f"w{i}_{j}"))
            outs.append(y)  # (..., rows_i)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def budget_model(parent: NemotronH, spec: SliceSpec) -> NemotronH:
    """The nested model ``spec`` of ``parent`` on views of the parent's tensors (see the module doc).

    Raises:
        ElasticError: ``parent`` is a quantized model (its W8A8 Linears quantize their inputs; slice
            it instead).
    """
    if any(isinstance(m, FakeQuantLinear) for m in parent.modules()):
        raise ElasticError("budgets of a quantized parent do not run on its views (its Linears quantize "
                           "their inputs)", hint=Hint("slice", "slice the budget with `elastic slice` and run that"))
    with torch.device("meta"):
        child = NemotronH(spec.child_arch(parent.arch))
    own = {**dict(parent.named_parameters(remove_duplicate=False)), **dict(parent.named_buffers())}
    rules = {r.name: r for r in tensor_rules(parent.arch, spec)}
    with torch.no_grad():  # views of trainable parameters would carry their autograd history
        _assign(child, own, rules)
    if child.arch.tie_word_embeddings:
        child.lm_head.weight = child.backbone.embeddings.weight
    left = [n for n, t in [*child.named_parameters(), *child.named_buffers()] if t is not None and t.is_meta]
    assert not left, f"budget model left unset: {left}"  # the rules cover every tensor of the child
    return child.eval()


def _assign(child: NemotronH, own: dict[str, torch.Tensor], rules: dict) -> None:
    """Every tensor of ``child`` from its rule: multi-range Linears as :class:`RangeLinear`, the rest narrowed."""
    done: set[str] = set()
    for name, module in list(child.named_modules()):
        w = rules.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or w is None or all(len(ax) == 1 for ax in w.axes):
            continue
        b = rules.get(f"{name}.bias")
        bias = own[b.source] if b is not None else None
        outer, leaf = name.rsplit(".", 1)
        setattr(child.get_submodule(outer), leaf, RangeLinear(own[w.source], bias, w.axes[0], w.axes[1]))
        done.update({w.name} | ({b.name} if b is not None else set()))
    for rule in rules.values():
        if rule.name in done:
            continue
        module_name, leaf = rule.name.rsplit(".", 1)
        module, t = child.get_submodule(module_name), narrow(own[rule.source], rule.axes)
        if isinstance(getattr(module, leaf), nn.Parameter):
            t = nn.Parameter(t, requires_grad=False)  # shares the view's storage
        setattr(module, leaf, t)


def storage_report(parent: NemotronH, model: nn.Module) -> dict[str, Any]:
    """Which of ``model``'s tensors live in the parent's storage (views) and which were gathered.

    Returns:
        ``view_bytes`` / ``copied_bytes`` (bytes the model's tensors address: inside the parent's
        storages, or in storages of their own), ``copied`` (names of the gathered tensors) and
        ``parent_bytes``.
    """
    def storages(m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: t for n, t in [*m.named_parameters(), *m.named_buffers()] if t is not None}

    spans = []
    for t in storages(parent).values():
        s = t.untyped_storage()
        spans.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    view = copied = 0
    names = []
    for name, t in storages(model).items():
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if any(a <= ptr < b for a, b in spans):
            view += nbytes
        else:
            copied += nbytes
            names.append(name)
    return {"view_bytes": view, "copied_bytes": copied, "copied": names,
            "parent_bytes": sum(t.numel() * t.element_size() for t in storages(parent).values())}


class ResidentParent:
    """One elastic checkpoint loaded once; any of its budgets runs on views of it.

    Budget models are built on first use and kept (they hold views and a few small vectors, not
    weights). ``lock`` serialises generation: one request runs at a time.

    Args:
        root: an elastic checkpoint directory (config.json + safetensors + elastic_config.json); a
            plain model directory serves only itself, as :data:`FULL`.
        dtype: run in this dtype (default: as stored).
    """

    def __init__(self, root: str | Path, dtype: torch.dtype | None = None):
        from elastic.slicer.formats.elastic_format import ElasticConfig
        from elastic.slicer.storage.reader import Checkpoint

        self.root = Path(root)
        self.ckpt = Checkpoint.open(self.root, require_weights=True)
        self.ec = ElasticConfig.read(self.root, self.ckpt.arch) if (self.root / "elastic_config.json").is_file() else None
        self.parent = load_model(self.ckpt, dtype=dtype)
        self.lock = threading.Lock()
        self._models: dict[str, NemotronH] = {}
        self._specs: dict[str, tuple[SliceSpec, str]] = {}
        self._tok = None

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (read once).

        Raises:
            CheckpointError: the checkpoint has no tokenizer.json.
        """
        from elastic.slicer.formats.tokenizer import require_tokenizer

        if self._tok is None:
            self._tok = require_tokenizer(self.root)
        return self._tok

    @property
    def budgets(self) -> list[str]:
        """The trained budgets' names, as elastic_config.json lists them."""
        return [b.name for b in self.ec.budgets] if self.ec is not None else [FULL]

    def spec(self, budget: str) -> tuple[SliceSpec, str]:
        """(spec, source) of a budget, resolved as ``elastic slice --budget`` resolves it."""
        from elastic.slicer.formats.elastic_format import resolve_budget

        if budget not in self._specs:
            if self.ec is None:
                if budget != FULL:
                    raise ConfigError(f"unknown budget {budget!r}: {self.root} has no elastic_config.json, so it "
                                      f"serves only itself as {FULL!r}", path=str(self.root))
                self._specs[budget] = SliceSpec.full(self.ckpt.arch), "full model"
            else:
                self._specs[budget] = resolve_budget(self.root, self.ec, self.ckpt.arch, budget)
        return self._specs[budget]

    def model(self, budget: str) -> NemotronH:
        """The budget's nested model on views of the parent (the parent itself for the full spec)."""
        if budget not in self._models:
            spec, _ = self.spec(budget)
            self._models[budget] = self.parent if spec.is_full(self.ckpt.arch) else budget_model(self.parent, spec)
        return self._models[budget]

    def backend(self, budget: str) -> TorchBackend:
        return TorchBackend(self.model(budget))

    def generate(self, budget: str, prompt: str, max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_text: Callable[[str], None] | None = None, max_context: int | None = None) -> dict[str, Any]:
        """``elastic.slicer.nn.generate.generate_text`` on the budget, plus ``budget`` and ``spec_source``.

        Raises:
            CheckpointError: the checkpoint has no tokenizer.json.
            ConfigError: an unknown budget (the trained ones listed).
            ElasticError: prompt + ``max_new_tokens`` is longer than ``max_context``.
        """
        from elastic.slicer.nn.generate import config_eos_token_id, generate_text

        tok = self.tokenizer
        eos = eos_token_id if eos_token_id is not None else config_eos_token_id(self.root)
        backend = self.backend(budget)
        with self.lock:
            r = generate_text(backend, tok, prompt, max_new_tokens, eos_token_id=eos, on_text=on_text,
                              max_context=max_context, path=str(self.root))
        return {**r, "budget": budget, "spec_source": self.spec(budget)[1]}


def generate_budget(root: str | Path, budget: str, prompt: str, max_new_tokens: int = 32, *,
                    on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy text from budget ``budget`` of the elastic checkpoint ``root`` without slicing it: the
    parent loads once and the budget runs on views of its tensors (``elastic generate --budget``).

    Returns:
        :meth:`ResidentParent.generate`'s keys plus ``load_s`` and ``storage`` (:func:`storage_report`
        without the names).
    """
    t0 = time.perf_counter()
    resident = ResidentParent(root)
    model = resident.model(budget)
    load_s = time.perf_counter() - t0
    report = storage_report(resident.parent, model)
    report.pop("copied")
    r = resident.generate(budget, prompt, max_new_tokens, on_text=on_text)
    return {**r, "load_s": round(load_s, 3), "storage": report}
