"""A budget run on the resident parent's tensors: the nested model built from views, no weight copies.

``budget_model(parent, spec)`` returns a :class:`NemotronH` of the child's architecture whose
weights are *views* of the parent's: a kept prefix (``W[:f, :d]``) is a strided view of the
parent's storage. A weight matrix whose rule keeps several ranges on an axis (Mamba ``in_proj``
rows ``[z[kept] | x[kept] | B | C | dt[kept]]``, ``out_proj`` columns, attention heads kept inside
each KV group) is not one view: :class:`RangeLinear` computes ``x W[rows, cols]^T`` from a few
views built once: kept rows as strided runs (one batched matmul per run of equal, evenly spaced
ranges), kept columns as the span they lie in (one matmul, the input zero-padded), so it is not
copied either. Only small
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
    >>> r = resident.generate_split("50%", "100%", "Hello", 64, max_think_tokens=48)  # think small, answer large

Budget control (:meth:`ResidentParent.generate_split`): the reasoning segment decodes greedily with
the think budget; it ends at the first of (1) the generated ids ending with ``</think>`` as the
tokenizer encodes it alone (:func:`think_end_ids`; a reasoning model's added token is one id), with
the ``</think>`` ids counted as thinking, (2) ``max_think_tokens`` thinking tokens, (3) the
end-of-sequence token or ``max_new_tokens`` (the request ends there: no answer). Then the answer
budget's model prefills prompt + thinking once and decodes the answer, so that thinking + answer
<= ``max_new_tokens``. When both budgets are one model, the decode simply goes on with its cache
(no second prefill): the output is the plain single-budget request's.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elastic.slicer.errors import ConfigError, ElasticError
from elastic.slicer.formats.rules import Ranges, indices, length, tensor_rules
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.nn.masked import narrow
from elastic.slicer.nn.model import FakeQuantLinear, NemotronH, TorchBackend, load_model

FULL = "100%"  # the name a parent without elastic_config.json serves itself under
# RangeLinear reads the whole span of an output's kept input columns (zero-padding the input) when
# they are at least this fraction of it and the weight is stored row-major: measured on a 390 MB
# parent's Mamba out_proj (37.5% kept: half the heads' channels of 3/4 of the heads), one pass over
# the span took half the time of a batched matmul over the strided pieces (bench/serve_bench.py)
PAD_FRACTION = 0.25
# ResidentParent stores each Mamba out_proj column-major (the same tensor, transposed in memory), so a
# kept input channel is one contiguous row of memory: a budget's strided channels of each head are
# then a batched matmul over contiguous rows, about the sliced child's speed where the span pass read
# twice the bytes (bench/serve_bench.py's 50% budget: tokens/s over the sliced child 0.880 -> 0.971).
# Inputs of more rows than this (a prefill) take the span pass instead, which holds no per-run partial
# outputs (count x rows x out)
WIDE_INPUT = 8


def runs(ranges: Ranges) -> list[tuple[int, int, int, int]]:
    """``ranges`` as regular runs ``(start, length, count, step)``: ``count`` ranges of one ``length``
    whose starts are ``step`` apart (``step`` 0 when ``count`` is 1).

    Example:
        >>> runs(((0, 4), (8, 12), (16, 20), (40, 42)))
        [(0, 4, 3, 8), (40, 2, 1, 0)]
    """
    out: list[list[int]] = []
    for a, b in ranges:
        last = out[-1] if out else None
        if last and b - a == last[1] and (last[2] == 1 or a - (last[0] + (last[2] - 1) * last[3]) == last[3]):
            if last[2] == 1:
                last[3] = a - last[0]
            last[2] += 1
        else:
            out.append([a, b - a, 1, 0])
    return [tuple(r) for r in out]


def _strided(t: torch.Tensor, dim: int, run: tuple[int, int, int, int],
             keep: tuple[int, int] | None = None) -> torch.Tensor:
    """A view of ``t`` (1-D or 2-D) holding one run of ranges on axis ``dim``: ``t[start:start+length]``
    (``count`` 1) or ``(count, ...)`` with the ranges stacked on a new leading axis; ``keep``
    narrows the other axis of a 2-D ``t`` to ``[a, b)``. Never a copy."""
    start, size, count, step = run
    if t.dim() == 2 and keep is not None:
        t = t.narrow(1 - dim, keep[0], keep[1] - keep[0])
    t = t.narrow(dim, start, size)
    if count == 1:
        return t
    return t.as_strided((count, *t.shape), (step * t.stride(dim), *t.stride()), t.storage_offset())


class RangeLinear(nn.Module):
    """``x W[rows, cols]^T (+ b[rows])`` from views of the parent's ``W``, no weight copy.

    ``rows`` / ``cols`` are the kept ranges of the parent's output / input axis (sorted, as the
    slicer keeps them): the child's input is their concatenation, and so is its output. Kept rows:
    ranges of one length at a constant spacing (a run: the kept channels of the heads of one group,
    the kept heads of every group) are one strided 3-D view and one batched matmul, so a Mamba
    ``in_proj`` costs a few matmuls per group, not one per head. Kept columns (``out_proj``,
    ``o_proj``) of a row-major weight: one matmul over the span they lie in, the input zero-padded
    (:data:`PAD_FRACTION`); of a column-major one (:func:`store_column_major`): a batched matmul per
    run of columns, and the span for a wide input (:data:`WIDE_INPUT`).
    The views and the plan are built once, here; ``forward`` only walks the plan.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: Ranges, cols: Ranges):
        super().__init__()
        self.in_features, self.out_features = length(cols), length(rows)
        # plan: one entry per matmul; "rows": a run of output rows over one column range; "cols": one
        # output-row range over a run of input columns; "block" / "add": the general case, one range
        # x one range. span_above: inputs of more rows than this take one matmul over the span of the
        # kept columns instead (the "span" buffer; None: no span)
        self.plan: list[tuple[str, str, str | None, int, int]] = []
        self.span_above: int | None = None
        if len(cols) == 1:
            for i, run in enumerate(runs(rows)):
                self._add("rows", i, _strided(weight, 0, run, cols[0]),
                          None if bias is None else _strided(bias, 0, run), 0, self.in_features)
        elif len(rows) == 1 and length(cols) >= PAD_FRACTION * (cols[-1][1] - cols[0][0]) \
                and not column_major(weight):
            # fine column ranges (an o_proj's heads, a row-major out_proj's kept channels of each head):
            # one matmul over the span of the kept columns, the input zero where a column is dropped.
            # A row's kept pieces are short, so strided blocks read about the whole row anyway, in
            # many small passes; one pass over the span is faster than a batched matmul per run
            self._span(weight, rows, cols, above=0)
            if bias is not None:
                self.register_buffer("bias", bias[rows[0][0]:rows[0][1]], persistent=False)
        elif len(rows) == 1:
            if column_major(weight) and len(cols) > 1:  # a wide input (prefill) takes one pass over the span
                self._span(weight, rows, cols, above=WIDE_INPUT)
            offset = 0
            for j, run in enumerate(runs(cols)):
                n = run[1] * run[2]
                self._add("cols", j, _strided(weight, 1, run, rows[0]), None, offset, offset + n)
                offset += n
            if bias is not None:
                self.register_buffer("bias", bias[rows[0][0]:rows[0][1]], persistent=False)
        else:
            starts = [0]
            for a, b in cols:
                starts.append(starts[-1] + b - a)
            k = 0
            for r0, r1 in rows:
                for j, (c0, c1) in enumerate(cols):
                    b = bias[r0:r1] if bias is not None and j == 0 else None
                    self._add("block" if j == 0 else "add", k, weight[r0:r1, c0:c1], b, starts[j], starts[j + 1])
                    k += 1
        if not hasattr(self, "bias"):
            self.bias = None

    def _span(self, weight: torch.Tensor, rows: Ranges, cols: Ranges, above: int) -> None:
        """The view of the kept rows over the whole span of the kept columns, where the input's
        columns go in it, and from how many input rows on it is used (``above``)."""
        self.span_above = above
        lo, hi = cols[0][0], cols[-1][1]
        self.span_width = hi - lo
        self.index = torch.tensor([i - lo for i in indices(cols)], device=weight.device)  # not a buffer: an index
        r0, r1 = rows[0]
        self.register_buffer("span", weight[r0:r1, lo:hi], persistent=False)

    def _add(self, kind: str, k: int, w: torch.Tensor, b: torch.Tensor | None, c0: int, c1: int) -> None:
        # non-persistent buffers: listed by named_buffers (storage_report), never saved, no copy
        self.register_buffer(f"w{k}", w, persistent=False)
        if b is not None:
            self.register_buffer(f"b{k}", b, persistent=False)
        self.plan.append((kind, f"w{k}", f"b{k}" if b is not None else None, c0, c1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in)
        n, buf = x.shape[0], self._buffers
        if self.span_above is not None and n > self.span_above:
            # (N, span): the input placed at its columns, zero elsewhere; one matmul
            xp = x.new_zeros(n, self.span_width).index_copy_(1, self.index, x)
            return F.linear(xp, buf["span"], self.bias).reshape(*lead, self.out_features)
        outs: list[torch.Tensor] = []
        y = None
        for kind, wn, bn, c0, c1 in self.plan:
            w, b = buf[wn], (buf[bn] if bn is not None else None)
            xs = x if c0 == 0 and c1 == x.shape[1] else x[:, c0:c1]
            if kind == "rows" and w.dim() == 3:  # (count, length, in): one bmm, rows of the run in order
                z = torch.matmul(xs, w.transpose(1, 2))  # (count, N, length)
                if b is not None:
                    z = z + b[:, None, :]
                outs.append(z.transpose(0, 1).reshape(n, -1))
            elif kind == "cols" and w.dim() == 3:  # (count, out, length): a sum over the run's column blocks
                z = torch.matmul(xs.reshape(n, w.shape[0], w.shape[2]).transpose(0, 1), w.transpose(1, 2)).sum(0)
                y = z if y is None else y + z
            elif kind == "cols" or kind == "add":
                z = F.linear(xs, w)
                if kind == "add":
                    outs[-1] = outs[-1] + z
                else:
                    y = z if y is None else y + z
            else:  # a 2-D block of rows
                outs.append(F.linear(xs, w, b))
        if y is not None:
            out = y if self.bias is None else y + self.bias
        else:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.reshape(*lead, self.out_features)


def column_major(weight: torch.Tensor) -> bool:
    """A 2-D weight stored transposed (its rows are columns of memory)."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride(0) == 1


def store_column_major(parent: NemotronH) -> None:
    """Store each Mamba ``out_proj`` weight of ``parent`` column-major (see :data:`WIDE_INPUT`): the
    same values, one matrix copied at a time; the parent computes as before (a matmul reads either
    layout)."""
    from elastic.slicer.nn.model import Mamba2Mixer, release_free_memory

    with torch.no_grad():
        for m in parent.modules():
            if isinstance(m, Mamba2Mixer) and isinstance(m.out_proj, nn.Linear) and not column_major(m.out_proj.weight):
                w = m.out_proj.weight
                m.out_proj.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)
                del w
    release_free_memory()


def budget_model(parent: NemotronH, spec: SliceSpec) -> NemotronH:
    """The nested model ``spec`` of ``parent`` on views of the parent's tensors (see the module doc).

    Raises:
        ElasticError: ``parent`` is a quantized model (its W8A8 Linears quantize their inputs; slice
            it instead).
    """
    if any(isinstance(m, FakeQuantLinear) for m in parent.modules()):
        raise ElasticError("budgets of a quantized parent do not run on its views (its Linears quantize "
                           "their inputs); slice the budget with `elastic slice` and run that")
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
        allow_off_curve: run a size no budget was trained for even where the checkpoint's size-curve
            record measured it outside its trained neighbours (refused otherwise, as ``elastic slice``
            refuses it).
        device: where the parent's tensors live ("cpu", "cuda", "cuda:1"); every budget runs there.

    Raises:
        ElasticError: ``device`` is a CUDA device and this PyTorch has none.
    """

    def __init__(self, root: str | Path, dtype: torch.dtype | None = None, allow_off_curve: bool = False,
                 device: str = "cpu"):
        from elastic.slicer.formats.elastic_format import ElasticConfig
        from elastic.slicer.storage.reader import Checkpoint

        self.root = Path(root)
        self.ckpt = Checkpoint.open(self.root, require_weights=True)
        self.ec = ElasticConfig.read(self.root, self.ckpt.arch) if (self.root / "elastic_config.json").is_file() else None
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ElasticError(f"device {device!r}: this PyTorch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        self.parent = load_model(self.ckpt, dtype=dtype, device=device)
        store_column_major(self.parent)
        self.lock = threading.Lock()
        self._models: dict[str, NemotronH] = {}
        self._specs: dict[str, tuple[SliceSpec, str]] = {}
        self._tok = None
        self.allow_off_curve = allow_off_curve

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
        """(spec, source) of a budget, resolved as ``elastic slice --budget`` resolves it.

        Raises:
            OffCurveSize: a size no budget was trained for that the size-curve record measured
                outside its trained neighbours, unless ``allow_off_curve``.
        """
        from elastic.slicer.slice import choose_spec

        if budget not in self._specs:
            if self.ec is None:
                if budget != FULL:
                    raise ConfigError(f"unknown budget {budget!r}: {self.root} has no elastic_config.json, so it "
                                      f"serves only itself as {FULL!r}", path=str(self.root))
                self._specs[budget] = SliceSpec.full(self.ckpt.arch), "full model"
            else:  # resolved and judged against the size curve as `elastic slice --budget` does
                self._specs[budget] = choose_spec(self.ckpt, budget, None, allow_off_curve=self.allow_off_curve)
        return self._specs[budget]

    def model(self, budget: str) -> NemotronH:
        """The budget's nested model on views of the parent (the parent itself for the full spec)."""
        if budget not in self._models:
            spec, _ = self.spec(budget)
            self._models[budget] = self.parent if spec.is_full(self.ckpt.arch) else budget_model(self.parent, spec)
        return self._models[budget]

    def backend(self, budget: str) -> TorchBackend:
        return TorchBackend(self.model(budget))

    def generate_split(self, think_budget: str, answer_budget: str, prompt: str, max_new_tokens: int, *,
                       max_think_tokens: int | None = None, eos_token_id: int | None = None,
                       on_text: Callable[[str], None] | None = None, max_context: int | None = None) -> dict[str, Any]:
        """Think with one budget, answer with another (see the module doc for where thinking ends).

        Returns:
            :func:`~elastic.slicer.nn.generate.generate_text`'s keys (``tokens``/``text``: thinking +
            answer) plus ``think_tokens`` / ``answer_tokens`` (counts), ``think_ended_by``
            (``"</think>"``, ``"max_think_tokens"``, ``"eos"``, ``"max_new_tokens"``), ``budgets``
            ({name: tokens}, one entry when both are one budget), ``budget`` (the answer budget),
            ``think_budget``, ``answer_budget``, ``answer_prefill_s``.

        Raises:
            CheckpointError: the checkpoint has no tokenizer.json.
            ConfigError: an unknown budget.
            ElasticError: prompt + ``max_new_tokens`` is longer than ``max_context``; ``max_think_tokens`` < 1.
        """
        from elastic.slicer.nn.generate import check_context, config_eos_token_id, encode_prompt

        if max_think_tokens is not None and max_think_tokens < 1:
            raise ElasticError(f"max_think_tokens must be at least 1, got {max_think_tokens}; leave it out to "
                               "think until </think>")
        tok = self.tokenizer
        eos = eos_token_id if eos_token_id is not None else config_eos_token_id(self.root)
        think = self.backend(think_budget)
        answer = think if self.model(answer_budget) is think.model else self.backend(answer_budget)
        ids, decodable = encode_prompt(tok, prompt, think.vocab_size)
        fed = ids or [tok.bos_id if tok.bos_id is not None and tok.bos_id < think.vocab_size else 0]
        check_context(len(fed), max_new_tokens, max_context, str(self.root))
        with self.lock:
            d = split_decode(think, answer, fed, max_new_tokens, end_ids=think_end_ids(tok),
                             max_think_tokens=max_think_tokens, eos_token_id=eos,
                             on_text=on_text if decodable else None, decode=lambda t: tok.decode(t, skip_special_tokens=True))
        if not d.pop("finite"):
            raise ElasticError("the model produced non-finite logits (NaN/inf): the model does not run correctly",
                               path=str(self.root))
        n_think, n_answer = d["think_tokens"], d["answer_tokens"]
        budgets = ({think_budget: n_think + n_answer} if think_budget == answer_budget
                   else {think_budget: n_think, answer_budget: n_answer})
        tokens = d["tokens"]
        return {"backend": think.name, "path": str(self.root), "prompt": prompt, "prompt_tokens": len(ids),
                "new_tokens": len(tokens), "text": tok.decode(tokens, skip_special_tokens=True) if decodable else None,
                **d, "tokens_per_s": round(len(tokens) / d["decode_s"], 1) if tokens and d["decode_s"] > 0 else None,
                "budgets": budgets, "budget": answer_budget, "think_budget": think_budget,
                "answer_budget": answer_budget, "spec_source": self.spec(answer_budget)[1]}

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


THINK_END = "</think>"


def think_end_ids(tok) -> list[int]:
    """The ids of ``</think>`` as ``tok`` encodes it alone (no special tokens added)."""
    return list(tok.encode(THINK_END, add_special_tokens=False))


def ends_thinking(tokens: list[int], end_ids: list[int]) -> bool:
    """Whether the generated ``tokens`` end with the ``</think>`` ids ``end_ids`` (never for empty ``end_ids``)."""
    return bool(end_ids) and len(tokens) >= len(end_ids) and tokens[-len(end_ids):] == end_ids


def split_decode(think, answer, ids: list[int], max_new_tokens: int, *, end_ids: list[int],
                 max_think_tokens: int | None = None, eos_token_id: int | None = None,
                 on_text: Callable[[str], None] | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
    """Greedy decoding that switches backend once, at the end of the reasoning segment.

    ``think`` prefills ``ids`` and decodes until :func:`ends_thinking`, ``max_think_tokens``, eos or
    ``max_new_tokens``; then ``answer`` (a backend, see ``elastic.slicer.nn.generate.Backend``)
    prefills ``ids`` + thinking once and decodes the rest. ``answer is think``: no second prefill.

    Returns:
        ``tokens``, ``think_tokens``, ``answer_tokens``, ``think_ended_by``, ``prefill_s``,
        ``answer_prefill_s``, ``decode_s`` (everything after the first prefill), ``finite``.
    """
    from elastic.slicer.nn.generate import TextStream

    stream = TextStream(decode) if on_text is not None and decode is not None else None
    t0 = time.perf_counter()
    backend = think
    logits, state = think.prefill([ids])
    t1 = time.perf_counter()
    tokens: list[int] = []
    n_think, ended_by, answer_prefill_s = None, "max_new_tokens", 0.0
    while len(tokens) < max_new_tokens:
        nxt = logits[:, -1].argmax(-1)
        tokens.append(int(nxt.tolist()[0]))
        if stream is not None and (piece := stream.push(tokens[-1])):
            on_text(piece)
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            ended_by = "eos" if n_think is None else ended_by
            break
        if n_think is None and (ends_thinking(tokens, end_ids) or len(tokens) == max_think_tokens):
            n_think = len(tokens)
            ended_by = "</think>" if ends_thinking(tokens, end_ids) else "max_think_tokens"
            if answer is not think:
                if len(tokens) == max_new_tokens:
                    break
                ta = time.perf_counter()
                backend, (logits, state) = answer, answer.prefill([ids + tokens])
                answer_prefill_s = time.perf_counter() - ta
                continue
            backend = answer
        logits, state = backend.step(nxt, state)
    if stream is not None and (piece := stream.finish()):
        on_text(piece)
    t2 = time.perf_counter()
    n_think = len(tokens) if n_think is None else n_think
    return {"tokens": tokens, "think_tokens": n_think, "answer_tokens": len(tokens) - n_think,
            "think_ended_by": ended_by, "prefill_s": round(t1 - t0, 4),
            "answer_prefill_s": round(answer_prefill_s, 4), "decode_s": round(t2 - t1, 4),
            "finite": math.isfinite(float(abs(logits).max()))}


def generate_budget(root: str | Path, budget: str, prompt: str, max_new_tokens: int = 32, *,
                    on_text: Callable[[str], None] | None = None, think_budget: str | None = None,
                    max_think_tokens: int | None = None, allow_off_curve: bool = False) -> dict[str, Any]:
    """Greedy text from budget ``budget`` of the elastic checkpoint ``root`` without slicing it: the
    parent loads once and the budget runs on views of its tensors (``elastic generate --budget``).
    With ``think_budget``: think with that budget, answer with ``budget``
    (:meth:`ResidentParent.generate_split`; ``elastic generate --think-budget --answer-budget``).

    Returns:
        :meth:`ResidentParent.generate`'s (or ``generate_split``'s) keys plus ``load_s`` and
        ``storage`` (:func:`storage_report` of the answer budget, without the names).
    """
    t0 = time.perf_counter()
    resident = ResidentParent(root, allow_off_curve=allow_off_curve)
    model = resident.model(budget)
    if think_budget is not None:
        resident.model(think_budget)  # an unknown think budget is refused before generating
    load_s = time.perf_counter() - t0
    report = storage_report(resident.parent, model)
    report.pop("copied")
    if think_budget is not None:
        r = resident.generate_split(think_budget, budget, prompt, max_new_tokens,
                                    max_think_tokens=max_think_tokens, on_text=on_text)
    else:
        r = resident.generate(budget, prompt, max_new_tokens, on_text=on_text)
    return {**r, "load_s": round(load_s, 3), "storage": report}
