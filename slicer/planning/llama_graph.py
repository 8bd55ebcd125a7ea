"""llama.cpp's compute buffer for a Nemotron-H model, without llama.cpp. No torch here.

llama.cpp reserves its compute buffer once, for the graph of a full ubatch (src/llama-context.cpp,
sched_reserve -> graph_reserve), and ggml's graph allocator places every intermediate tensor of that
graph in one buffer (ggml/src/ggml-alloc.c, ggml_gallocr_alloc_graph_impl): graph inputs first, then
each node in order, in place over a parent where the op allows it (ggml_op_can_inplace) and the
parent has no other consumer, freeing a tensor after its last consumer (views keep their source
alive), never freeing graph outputs; each allocation takes the best-fitting free block, else the end
of the buffer (ggml_dyn_tallocr_alloc). The buffer's size is the highest end it reached. Fragmentation
makes that more than the largest set of live tensors, so this module builds the tensors of the graph
llama.cpp builds for Nemotron-H (src/models/nemotron-h.cpp, src/models/mamba-base.cpp
build_mamba2_layer, src/llama-graph.cpp build_attn with flash attention, build_ffn) with their sizes
and replays the allocator over them (:func:`compute_buffer_bytes`). Weights, the KV cache and the
recurrent state live in other buffers and are not counted; tiny index tensors are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

F32 = 4
ALIGNMENT = 32  # the CPU buffer's alignment (ggml-impl.h TENSOR_ALIGNMENT)


@dataclass(eq=False)
class Tensor:
    """One tensor of the graph: bytes, sources, and how the allocator treats it."""

    nbytes: int
    src: tuple["Tensor", ...] = ()
    view_of: "Tensor | None" = None  # a view (reshape, permute, slice) of this tensor: no memory of its own
    inplace: bool = False  # its op may overwrite a parent of the same size (ggml_op_can_inplace)
    input: bool = False  # set by llama.cpp before the graph runs: allocated before every node
    output: bool = False  # read after the graph ran: never freed
    children: int = field(default=0, repr=False)
    views: int = field(default=0, repr=False)
    offset: int | None = field(default=None, repr=False)


class _Allocator:
    """ggml_dyn_tallocr with one chunk: free blocks sorted by offset, the last one unbounded."""

    def __init__(self) -> None:
        self.free: list[list[int]] = [[0, 1 << 62]]  # [offset, size]
        self.top = 0

    def alloc(self, size: int) -> int:
        size = -(-size // ALIGNMENT) * ALIGNMENT
        best = None
        for i, (_, n) in enumerate(self.free[:-1]):  # best fit, the last block aside
            if n >= size and (best is None or n <= self.free[best][1]):
                best = i
        i = best if best is not None else len(self.free) - 1
        offset = self.free[i][0]
        self.free[i][0] += size
        self.free[i][1] -= size
        if self.free[i][1] == 0:
            del self.free[i]
        self.top = max(self.top, offset + size)
        return offset

    def release(self, offset: int, size: int) -> None:
        size = -(-size // ALIGNMENT) * ALIGNMENT
        for i, block in enumerate(self.free):
            if block[0] + block[1] == offset:  # after this block
                block[1] += size
                if i + 1 < len(self.free) and block[0] + block[1] == self.free[i + 1][0]:
                    block[1] += self.free[i + 1][1]
                    del self.free[i + 1]
                return
            if offset + size == block[0]:  # before it
                block[0], block[1] = offset, block[1] + size
                if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == block[0]:
                    self.free[i - 1][1] += block[1]
                    del self.free[i]
                return
        self.free.append([offset, size])
        self.free.sort()


def peak_bytes(nodes: list[Tensor], inputs: list[Tensor] = ()) -> int:
    """The compute buffer ggml's allocator reserves for ``nodes`` (in graph order) and the graph's
    ``inputs`` (allocated first, in this order): the top of the buffer after replaying
    ggml_gallocr_alloc_graph_impl over them."""
    a = _Allocator()
    owned: set[int] = set()

    def allocate(t: Tensor) -> None:
        if t.offset is not None or t.view_of is not None or not t.nbytes:  # placed, a view, or external
            return
        if t.inplace:
            for p in t.src:
                if id(p) not in owned or p.output or p.nbytes != t.nbytes or p.children != 1 or p.views:
                    continue
                if p.view_of is not None:
                    v = p.view_of
                    if v.views != 1 or v.children or v.output:
                        continue
                    owned.discard(id(v))
                t.offset = p.offset
                owned.discard(id(p))
                owned.add(id(t))
                return
        t.offset = a.alloc(t.nbytes)
        owned.add(id(t))

    def release(t: Tensor) -> None:
        if id(t) in owned and not t.output:
            a.release(t.offset, t.nbytes)
            owned.discard(id(t))

    for n in nodes:
        if n.view_of is not None:
            n.view_of.views += 1
        for s in n.src:
            s.children += 1
    for t in inputs:  # graph inputs first
        allocate(t)
    for n in nodes:
        allocate(n)
        for p in n.src:
            p.children -= 1
            if p.children or p.views:
                continue
            if p.view_of is not None:
                v = p.view_of
                v.views -= 1
                if not v.views and not v.children:
                    release(v)
            else:
                release(p)
    return a.top


class _Graph:
    """Tensors made as llama.cpp makes them; ``expand`` adds a tensor's not yet added ancestors and
    itself in depth-first order (ggml_build_forward_expand), which is the order they are allocated in."""

    def __init__(self) -> None:
        self.nodes: list[Tensor] = []
        self.inputs: list[Tensor] = []  # set by llama.cpp before the graph runs
        self.seen: set[int] = set()

    def op(self, nbytes: int, *src: Tensor, inplace: bool = False, output: bool = False) -> Tensor:
        return Tensor(nbytes, src, inplace=inplace, output=output)

    def view(self, t: Tensor) -> Tensor:
        return Tensor(0, (t,), view_of=t.view_of or t)

    def store(self, t: Tensor) -> None:
        """A copy of ``t`` into the KV cache or the recurrent state (its result lives there), expanded."""
        self.expand(Tensor(0, (self.view(t),)))

    def expand(self, t: Tensor) -> None:
        if id(t) in self.seen or t.input:
            return
        self.seen.add(id(t))
        for s in t.src:
            self.expand(s)
        self.nodes.append(t)


def _mamba(g: _Graph, arch, layer, h: Tensor, t: int) -> Tensor:
    """build_mamba2_layer: in_proj, the conv over [state | xBC], ssm_scan, gate and norm, out_proj."""
    H, P, G, N, K = layer.mamba_num_heads, layer.mamba_head_dim, arch.n_groups, arch.ssm_state_size, arch.conv_kernel
    I = H * P
    conv = I + 2 * G * N
    rows = g.op((K - 1) * conv * F32)  # build_rs: the conv state's rows (get_rows), expanded at once
    g.expand(rows)
    zxbcdt = g.op(t * (2 * I + 2 * G * N + H) * F32, h)  # ssm_in: [z | xBC | dt]
    conv_x = g.op((t + K - 1) * conv * F32, g.view(rows), g.view(g.view(zxbcdt)))  # concat(state, xBC^T)
    g.store(conv_x)  # its last K-1 columns into the conv state: expands everything above
    xbc = g.op(t * conv * F32, conv_x)  # ssm_conv
    xbc = g.op(t * conv * F32, xbc, inplace=True)  # + conv1d.bias
    xbc = g.op(t * conv * F32, xbc, inplace=True)  # silu
    x = g.view(xbc)
    dt = g.op(t * H * F32, g.view(zxbcdt))  # cont(dt)
    dt = g.op(t * H * F32, dt, inplace=True)  # + dt_bias
    y = g.op((t * I + N * I) * F32, x, dt, g.view(xbc), g.view(xbc))  # ssm_scan: y and the new state
    g.expand(y)
    g.store(y)  # the new state into the recurrent state
    xd = g.op(t * I * F32, x, inplace=True)  # x * D
    yd = g.op(t * I * F32, g.view(y), xd, inplace=True)  # y + x * D
    z = g.op(t * I * F32, g.view(zxbcdt))  # cont(z)
    gated = g.op(t * I * F32, z, yd)  # swiglu_split(z, y)
    normed = g.op(t * I * F32, g.view(gated), inplace=True)  # grouped rms_norm
    normed = g.op(t * I * F32, normed, inplace=True)  # * ssm_norm.weight
    return g.op(t * arch.hidden_size * F32, g.view(normed))  # ssm_out


def _attention(g: _Graph, arch, layer, h: Tensor, t: int, mask: Tensor) -> Tensor:
    """build_attn with flash attention: q, k, v; k and v into the cache; flash_attn_ext; attn_output."""
    A, KV, hd = layer.num_attention_heads, layer.num_key_value_heads, arch.head_dim
    q, k, v = g.op(t * A * hd * F32, h), g.op(t * KV * hd * F32, h), g.op(t * KV * hd * F32, h)
    for x in (q, v, k):
        g.expand(x)
    k_idx, v_idx = g.inputs[2:4]
    g.expand(Tensor(0, (g.view(k), k_idx)))  # set_rows of K and V into the cache
    g.expand(Tensor(0, (g.view(v), v_idx)))
    fa = g.op(t * A * hd * F32, g.view(q), mask)
    g.expand(fa)
    return g.op(t * arch.hidden_size * F32, g.view(fa))


def _ffn(g: _Graph, arch, layer, h: Tensor, t: int) -> Tensor:
    """build_ffn (relu^2, no gate); an MoE layer: router, top-k experts, shared expert (an estimate)."""
    d = arch.hidden_size
    if layer.kind == "mlp":
        up = g.op(t * layer.intermediate_size * F32, h)
        up = g.op(up.nbytes, g.op(up.nbytes, up, inplace=True), inplace=True)  # relu, sqr
        return g.op(t * d * F32, up)
    E, k, Fe, Fs = layer.n_routed_experts, arch.num_experts_per_tok, layer.moe_intermediate_size, \
        layer.moe_shared_expert_intermediate_size
    probs = g.op(t * E * F32, g.op(t * E * F32, h))
    up = g.op(t * k * Fe * F32, h, probs)
    routed = g.op(t * d * F32, g.op(t * k * d * F32, g.op(up.nbytes, up, inplace=True)))
    shared = g.op(t * d * F32, g.op(t * Fs * F32, g.op(t * Fs * F32, h), inplace=True))
    return g.op(t * d * F32, routed, shared, inplace=True)


def nemotron_h_graph(arch, n_tokens: int, n_kv: int, n_outputs: int) -> _Graph:
    """The tensors of llama.cpp's Nemotron-H graph for one ubatch of ``n_tokens`` (one sequence),
    flash attention on, ``n_kv`` KV cells, ``n_outputs`` rows of logits, in graph order."""
    t, d = n_tokens, arch.hidden_size
    g = _Graph()
    tokens = Tensor(t * 4, input=True)
    # build_inp_embd's second input, the vector-embeddings path (t x n_embd float32): an input whether or
    # not the batch uses it, selected away (ggml_build_forward_select) and so never freed
    embd = Tensor(t * d * F32, input=True, output=True)
    idxs = [Tensor(t * 8, input=True) for _ in range(2)]  # where K and V rows go in the cache (int64)
    mask = Tensor(n_kv * t * 2, input=True)  # f16 with flash attention (build_attn_inp_kq_mask)
    out_ids = Tensor(n_outputs * 4, input=True)
    g.inputs = [tokens, embd, *idxs, mask, out_ids] if any(x.kind == "attention" for x in arch.layers) \
        else [tokens, embd, out_ids]
    x = g.op(t * d * F32, tokens)  # inp_embd: get_rows of token_embd
    g.expand(x)
    for layer in arch.layers:
        h = g.op(t * d * F32, g.op(t * d * F32, x, inplace=True), inplace=True)  # rms_norm, * attn_norm.weight
        if layer.kind == "mamba":
            out = _mamba(g, arch, layer, h, t)
        elif layer.kind == "attention":
            out = _attention(g, arch, layer, h, t, mask)
        else:
            out = _ffn(g, arch, layer, h, t)
        x = g.op(t * d * F32, out, x, inplace=True)  # + residual
    h = g.op(t * d * F32, g.op(t * d * F32, x, inplace=True), inplace=True, output=True)  # h_nextn: an output
    rows = g.op(n_outputs * d * F32, h, out_ids, output=True)  # result_norm
    g.expand(g.op(n_outputs * arch.vocab_size * F32, rows, output=True))  # result_output: the logits
    return g


def compute_buffer_bytes(arch, context: int, ubatch: int = 512, batch: int = 1) -> int:
    """llama.cpp's "compute buffer size" for ``arch`` at ``context`` tokens (rounded up to 256, as
    llama.cpp rounds its context): the allocator's replay over the graph of one full ubatch."""
    ctx = -(-context // 256) * 256
    t = min(ubatch, ctx)
    g = nemotron_h_graph(arch, t, ctx * batch, t)
    return peak_bytes(g.nodes, g.inputs)
