"""Q/DQ graphs for a Model Optimizer checkpoint: each quantized Linear keeps its quantized weight in
``weights.bin`` and dequantizes it in the graph (ONNX ``DequantizeLinear``), the form TensorRT
builds explicitly quantized engines from.

The graphs are traced on the float ``meta`` model as usual; after ``Transpose(W)`` became the
initializer ``W.T`` (``onnx_export._fold_weight_transposes``), :func:`rewrite` replaces that float
initializer of every quantized Linear by (the weights are stored transposed, ``(in, out)``)::

    W.T (int8 | float8e4m3fn | int4, (in, out)) --DequantizeLinear(weight_scale)--> MatMul input 1
    x --[Mul pre_quant_scale]--[QuantizeLinear input_scale -> DequantizeLinear input_scale]--> MatMul input 0

=====================  ================================  =====================================  ======
quant_algo             weight DequantizeLinear           input                                  opset
=====================  ================================  =====================================  ======
FP8                    FLOAT8E4M3FN, per tensor          Q/DQ FLOAT8E4M3FN, input_scale         19
W8A8_SQ_PER_CHANNEL    INT8, per channel (axis 1)        Mul pre_quant_scale, Q/DQ INT8         18
W8A16                  INT8, per channel (axis 1)        as is                                  18
W4A16_AWQ              INT4, blocked (axis 0, group)     Mul pre_quant_scale                    21
=====================  ================================  =====================================  ======

Opsets: FLOAT8E4M3FN Q/DQ arrive in opset 19, INT4 and ``block_size`` in opset 21; per-axis INT8
Q/DQ exist since opset 13, so int8 keeps the float default 18 (19 for float16 graphs: a float16
scale needs opset 19). NVFP4 is not offered (its two-level fp4 blocks need opset 23).

Rounding: ONNX QuantizeLinear rounds half to even and saturates (INT8 to [-128, 127], FLOAT8E4M3FN
to +-448 with ``saturate=1``, the default), which is what ``elastic.slicer.quant.dequant.fake_quant_input``
(Model Optimizer's static input quantizer) computes.

Example:
    >>> q = plan(ckpt, torch.float32)            # None for a float checkpoint
    >>> rewrite(graph, q)                         # after _fold_weight_transposes
    >>> get = quantized_source(ckpt, q)          # the bytes of each Q/DQ initializer
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastic.slicer.errors import ElasticError

PREFIX = "model."
ZERO_POINT = "input_zero_point"  # one scalar zero per graph, typing every activation QuantizeLinear
# quant_algo -> (weight ONNX type name, opset for float32 graphs)
FORMATS = {"FP8": ("FLOAT8E4M3FN", 19), "W8A8_SQ_PER_CHANNEL": ("INT8", 18), "W8A16": ("INT8", 18),
           "W4A16_AWQ": ("INT4", 21)}
ACT_TYPES = {"fp8": "FLOAT8E4M3FN", "int8": "INT8"}


@dataclass(frozen=True)
class QdqPlan:
    """How a quantized checkpoint becomes Q/DQ graphs."""

    layout: Any  # elastic.slicer.quant.layout.QuantLayout
    modules: frozenset[str]  # quantized Linear modules ("backbone.layers.0.mixer.in_proj")
    smoothed: frozenset[str]  # those with a pre_quant_scale tensor
    dtype: Any  # torch dtype of the graphs (scales are stored in it)
    opset: int

    @property
    def weight_type(self) -> str:
        return FORMATS[self.layout.quant_algo][0]

    @property
    def activations(self) -> str | None:
        return self.layout.format.activations


def plan(ckpt, dtype) -> QdqPlan | None:
    """The Q/DQ plan of ``ckpt`` for graphs in ``dtype``; None for a float checkpoint.

    Raises:
        ElasticError: a quantization with no ONNX Q/DQ form here (NVFP4).
    """
    import torch

    from elastic.slicer.quant.layout import linear_modules

    q = ckpt.quant
    if q is None:
        return None
    if q.quant_algo not in FORMATS:
        raise ElasticError(f"{q.quant_algo} checkpoints cannot be exported as ONNX Q/DQ graphs yet (NVFP4's "
                           "two-level fp4 blocks need opset 23, beyond TensorRT 10's parser); slice with "
                           "--precision fp8, int8, int8_wo or int4 for an ONNX/TensorRT export")
    linears = linear_modules({n: t.shape for n, t in ckpt.tensors.items()})
    modules = {m for m in linears if f"{m}.weight_scale" in ckpt.tensors}  # quantized: a scale beside the weight
    smoothed = {m for m in modules if f"{m}.pre_quant_scale" in ckpt.tensors}
    opset = FORMATS[q.quant_algo][1]
    if dtype == torch.float16:
        opset = max(opset, 19)  # QuantizeLinear/DequantizeLinear take float16 scales from opset 19
    return QdqPlan(q, frozenset(modules), frozenset(smoothed), dtype, opset)


def rewrite(graph, q: QdqPlan) -> set[str]:
    """Replace each quantized Linear's float ``W.T`` initializer in ``graph`` by its quantized
    initializer and a DequantizeLinear (plus the input's Mul / QuantizeLinear / DequantizeLinear).

    The new initializers are placeholders (offset 0), placed once ``weights.bin`` is written.

    Returns:
        the names of the initializers it made (their bytes come from :func:`quantized_source`).

    Raises:
        ElasticError: a quantized weight is used other than as a MatMul/Gemm right operand (a bug).
    """
    import onnx_ir as ir

    from .layout import TRANSPOSED, WEIGHTS

    float_type = ir.DataType.FLOAT16 if str(q.dtype).endswith("float16") else ir.DataType.FLOAT
    wtype = getattr(ir.DataType, q.weight_type)
    group = q.layout.group_size if q.layout.quant_algo == "W4A16_AWQ" else None
    made: dict[str, ir.Value] = {}

    def init(name: str, dtype, shape: tuple[int, ...]) -> ir.Value:
        if name not in made:
            tensor = ir.ExternalTensor(WEIGHTS, 0, 0, dtype, shape=ir.Shape(shape), name=name)
            made[name] = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
            graph.register_initializer(made[name])
        return made[name]

    order = {id(n): k for k, n in enumerate(graph)}
    for module in sorted(q.modules):
        name = PREFIX + module + ".weight" + TRANSPOSED
        w = graph.initializers.get(name)
        if w is None:
            continue  # not in this graph (never happens for the Linear layers of a Nemotron-H)
        inp, out = (int(d) for d in w.shape)
        uses = sorted(w.uses(), key=lambda u: order[id(u.node)])
        for use in uses:
            node = use.node
            transb = node.attributes.get("transB")
            if node.op_type not in ("MatMul", "Gemm") or use.idx != 1 or (transb is not None and transb.value):
                raise ElasticError(f"{module}: its weight feeds {node.op_type} input {use.idx}, not a MatMul's right "
                                   "operand; the Q/DQ rewrite does not know this graph; this is a bug, please report it")
        graph.initializers.pop(name)
        qw = init(name, wtype, (inp, out))
        if group:  # blocked along the input (rows of W.T): scale (in/group, out)
            scale = init(PREFIX + module + ".weight_scale", float_type, (inp // group, out))
            attrs = {"axis": 0, "block_size": group}
        elif q.layout.quant_algo == "FP8":  # one scale per tensor
            scale = init(PREFIX + module + ".weight_scale", float_type, ())
            attrs = {}
        else:  # per output channel: the columns of W.T
            scale = init(PREFIX + module + ".weight_scale", float_type, (out,))
            attrs = {"axis": 1}
        dq = ir.node("DequantizeLinear", [qw, scale], attributes=attrs, name=f"{module}.weight_dq")
        dq.outputs[0].name, dq.outputs[0].shape, dq.outputs[0].type = (f"{module}.weight_dq", ir.Shape([inp, out]),
                                                                        ir.TensorType(float_type))
        graph.insert_before(uses[0].node, dq)
        w.replace_all_uses_with(dq.outputs[0])
        for k, use in enumerate(uses):
            x = use.node.inputs[0]
            nodes = []
            if module in q.smoothed:  # SmoothQuant / AWQ: the input is scaled per channel first
                pqs = init(PREFIX + module + ".pre_quant_scale", float_type, (inp,))
                nodes.append(ir.node("Mul", [x, pqs], name=f"{module}.pre_quant_scale_mul.{k}"))
                x = nodes[-1].outputs[0]
            if q.activations:  # W8A8: the input is quantized with the static input_scale
                s = init(PREFIX + module + ".input_scale", float_type, ())
                zp = init(PREFIX + ZERO_POINT + "." + q.activations, getattr(ir.DataType, ACT_TYPES[q.activations]), ())
                nodes.append(ir.node("QuantizeLinear", [x, s, zp], name=f"{module}.input_q.{k}"))
                nodes.append(ir.node("DequantizeLinear", [nodes[-1].outputs[0], s, zp], name=f"{module}.input_dq.{k}"))
            if nodes:
                for j, n in enumerate(nodes):
                    n.outputs[0].name = f"{n.name}.out"
                    n.outputs[0].shape = use.node.inputs[0].shape
                    n.outputs[0].type = (ir.TensorType(getattr(ir.DataType, ACT_TYPES[q.activations]))
                                         if n.op_type == "QuantizeLinear" else ir.TensorType(float_type))
                graph.insert_before(use.node, nodes)
                use.node.replace_input_with(0, nodes[-1].outputs[0])
    return set(made)


def quantized_source(ckpt, q: QdqPlan) -> Callable[[str], tuple[Any, tuple[int, ...]]]:
    """``get(initializer name without "model.") -> (tensor of the stored bytes, logical shape)`` for
    the initializers :func:`rewrite` made, read from the checkpoint one tensor at a time.

    - ``M.weight.T``: the quantized weight transposed to (in, out). INT4: Model Optimizer packs
      rows 2k and 2k+1 (of (out, in)) into byte row k, 2k in the low nibble; ONNX INT4 packs
      consecutive elements of the flattened tensor two per byte, the first in the low nibble. In
      (in, out) order output columns 2k, 2k+1 are consecutive, so the transposed packed bytes
      (in, out/2) are exactly ONNX's layout: nothing is repacked.
    - ``M.weight_scale``: per tensor () / per channel (out,) / per group, transposed (in/group, out).
    - ``M.input_scale``, ``M.pre_quant_scale``: as stored, in the graph dtype.
    - ``input_zero_point.fp8|int8``: a scalar 0 of the activation type.
    """
    import torch

    def get(name: str):
        if name.startswith(ZERO_POINT):
            kind = name.rsplit(".", 1)[1]
            t = torch.zeros((), dtype=torch.float8_e4m3fn if kind == "fp8" else torch.int8)
            return t, ()
        if name.endswith(".weight.T"):
            t = ckpt.read(name.removesuffix(".T"))  # (out, in), or (out/2, in) packed int4
            if q.weight_type == "INT4":
                return t.t().contiguous(), (t.shape[1], t.shape[0] * 2)
            return t.t().contiguous(), (t.shape[1], t.shape[0])
        t = ckpt.read(name).to(q.dtype)
        if name.endswith(".weight_scale") and t.ndim == 2:
            t = t.t()  # (out, in/group) -> (in/group, out)
        t = t.contiguous()
        return t, tuple(t.shape)

    return get
