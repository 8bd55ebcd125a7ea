"""ONNX export: ONNX Runtime against the PyTorch reference (DESIGN.md section 8), the TensorRT
operator check, the trtexec script, the CLI. The demo checkpoint is sliced to each budget first."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx
from onnx import TensorProto, helper
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.export import trt
from elastic.export.graphs import cache_tensors, state_tensors
from elastic.export.pipeline import export_model
from elastic.export.runtime import OnnxGenerator
from elastic.profiles.devices import get_profile
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.nn.model import generate, load_model
from elastic.slicer.slice import slice_checkpoint

runner = CliRunner()
TOL = 1e-4


@pytest.fixture(scope="module", params=["100%", "75%", "50%"])
def exported(request, tmp_path_factory):
    """(model dir, export dir, summary, reference model) for one budget of the demo checkpoint."""
    root = tmp_path_factory.mktemp("export")
    model_dir = slice_checkpoint(DEMO_CHECKPOINT, root / "model", budget=request.param).out
    summary = export_model(model_dir, root / "onnx").to_json()
    return model_dir, root / "onnx", summary, load_model(model_dir)


def _ids(b, l, vocab, seed):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def _reference_prefill(model, b, l, seed):
    """(ids, the reference model's cache after them, its logits) for b x l random ids."""
    ids = _ids(b, l, model.arch.vocab_size, seed=seed)
    cache = model.new_cache()
    with torch.no_grad():
        ref = model(ids, cache=cache)
    return ids, cache, ref


def _assert_states_equal(state, model, cache, dims=None):
    """Every state tensor of an ONNX run equals the reference cache's (and has shape ``dims``' if given)."""
    states = state_tensors(model.arch)
    for s, want in zip(states, cache_tensors(cache, states)):
        if dims is not None:
            assert state[s.name].shape == tuple(want.shape) == s.dims(*dims)
        np.testing.assert_allclose(state[s.name], want.numpy(), rtol=0, atol=TOL)


@pytest.mark.heavy
@pytest.mark.parametrize("b,l", [(1, 1), (2, 16), (3, 37)])  # one token; exactly one chunk; several + padding
def test_prefill_matches_pytorch(exported, b, l):
    _, out, _, model = exported
    gen = OnnxGenerator(out)
    ids, cache, ref = _reference_prefill(model, b, l, seed=l)
    logits, state = gen.prefill(ids.numpy(), all_logits=True)
    assert logits.shape == (b, l, model.arch.vocab_size)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=TOL)
    _assert_states_equal(state, model, cache, dims=(b, l))


@pytest.mark.heavy
def test_decode_matches_pytorch_over_several_steps(exported):
    _, out, _, model = exported
    gen = OnnxGenerator(out)
    ids, cache, _ = _reference_prefill(model, 2, 21, seed=1)
    _, state = gen.prefill(ids.numpy())
    with torch.no_grad():
        for step in range(6):
            nxt = _ids(2, 1, model.arch.vocab_size, seed=100 + step)[:, 0]  # not greedy: any token must work
            ref = model(nxt[:, None], cache=cache)
            logits, state = gen.step(nxt.numpy(), state)
            assert logits.shape == (2, 1, model.arch.vocab_size)
            np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=TOL)
    keys = [s.name for s in state_tensors(model.arch) if s.kind == "key"]
    assert all(state[k].shape[2] == 21 + 6 for k in keys)  # the KV cache grew by one per step


@pytest.mark.heavy
def test_greedy_tokens_equal_pytorch(exported):
    _, out, _, model = exported
    ids = _ids(2, 9, model.arch.vocab_size, seed=2)
    want = generate(model, ids, max_new_tokens=12)
    got = OnnxGenerator(out).generate(ids.numpy(), max_new_tokens=12)
    assert got.tolist() == want.tolist()


@pytest.mark.heavy
def test_summary_parity_checker_and_operators(exported):
    _, out, summary, model = exported
    p = summary["parity"]
    assert p["ok"] and p["greedy_tokens_equal"]
    assert max(p["prefill_max_abs_diff"], p["decode_max_abs_diff"], p["state_max_abs_diff"],
               p["chunked_prefill_max_abs_diff"]) <= TOL
    assert summary["opset"] == 18 and summary["external_data"] is True
    assert summary["unsupported_ops"] == []  # every node parses in TensorRT 10.x (see the check tests below)
    for name in ("prefill.onnx", "decode.onnx", "extend.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir())
    readme = (out / "README.md").read_text()
    assert "Opset 18" in readme and all(f"`{s.name}`" in readme for s in state_tensors(model.arch))


@pytest.mark.heavy
def test_graph_inputs_and_outputs(exported):
    _, out, _, model = exported
    vocab, states = model.arch.vocab_size, state_tensors(model.arch)

    def io(vs):
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in vs}

    pre = onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph
    dec = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    assert io(pre.input) == {"input_ids": (TensorProto.INT64, ["batch", "seq"])}
    assert [o.name for o in pre.output] == ["logits"] + ["present_" + s.name for s in states]
    assert io(pre.output)["logits"] == (TensorProto.FLOAT, ["batch", "seq", vocab])
    assert [i.name for i in dec.input] == ["input_ids"] + ["past_" + s.name for s in states]
    assert io(dec.input)["input_ids"] == (TensorProto.INT64, ["batch", 1])
    assert io(dec.output)["logits"] == (TensorProto.FLOAT, ["batch", 1, vocab])
    for s in states:
        elem, shape = io(dec.input)["past_" + s.name]
        assert elem == TensorProto.FLOAT and shape == list(s.shape)
        if s.kind == "ssm_state":
            assert shape[1:] == [model.arch.layers[s.layer].mamba_num_heads, model.arch.layers[s.layer].mamba_head_dim,
                                 model.arch.ssm_state_size]
    keys = [s.name for s in states if s.kind == "key"]  # a budget may have dropped every attention layer
    assert all(io(dec.output)[f"present_{k}"][1][2] == "past + 1" for k in keys)
    assert keys or not any(layer.kind == "attention" for layer in model.arch.layers)
    ext = onnx.load(str(out / "extend.onnx"), load_external_data=False).graph
    assert [i.name for i in ext.input] == [i.name for i in dec.input]
    assert io(ext.input)["input_ids"] == (TensorProto.INT64, ["batch", "seq"])
    assert [o.name for o in ext.output] == [o.name for o in dec.output]
    assert io(ext.output)["logits"] == (TensorProto.FLOAT, ["batch", 1, vocab])  # the last position's only


@pytest.mark.heavy
@pytest.mark.parametrize("chunk", [None, 2, 5, 16, 36])  # 37 tokens: a one-token last chunk (decode.onnx) at 2, 36
def test_chunked_prefill_equals_the_reference(exported, chunk):
    """extend.onnx from an empty state, chunk after chunk (decode.onnx for a last single token; None:
    one chunk of 512): the last position's logits and every state equal the reference model's
    whole-prompt prefill."""
    _, out, _, model = exported
    gen = OnnxGenerator(out)
    ids, cache, ref = _reference_prefill(model, 2, 37, seed=3)
    logits, state = gen.prefill(ids.numpy(), chunk=chunk)
    assert logits.shape == (2, 1, model.arch.vocab_size)
    np.testing.assert_allclose(logits[:, 0], ref[:, -1].numpy(), rtol=0, atol=TOL)
    _assert_states_equal(state, model, cache)
    got = OnnxGenerator(out, prefill_chunk=chunk).generate(ids.numpy(), max_new_tokens=6)
    assert got.tolist() == generate(model, ids, max_new_tokens=6).tolist()


@pytest.mark.heavy
def test_float16_graphs_hold_float16_weights_and_run(tmp_path):
    """--dtype float16: the graphs are traced in float16 (they once declared float32 initializers over
    float16 bytes, and ONNX Runtime could not map weights.bin); ONNX Runtime runs them, whole and chunked,
    within float16's rounding of the float32 reference."""
    s = export_model(DEMO_CHECKPOINT, tmp_path / "f16", dtype="float16").to_json()
    out, model = tmp_path / "f16", load_model(DEMO_CHECKPOINT)
    assert s["dtype"] == "float16"
    for name in ("prefill.onnx", "decode.onnx", "extend.onnx"):
        inits = {i.name: i.data_type for i in onnx.load(str(out / name), load_external_data=False).graph.initializer}
        assert inits["model.backbone.embeddings.weight"] == TensorProto.FLOAT16
    ids = _ids(2, 37, model.arch.vocab_size, seed=5)
    with torch.no_grad():
        ref = model(ids).numpy()
    gen = OnnxGenerator(out)
    whole, _ = gen.prefill(ids.numpy(), all_logits=True)
    chunked, _ = gen.prefill(ids.numpy(), chunk=5)
    np.testing.assert_allclose(whole, ref, rtol=0, atol=0.05)
    np.testing.assert_allclose(chunked[:, 0], ref[:, -1], rtol=0, atol=0.05)


@pytest.mark.heavy
def test_an_export_without_extend_prefills_in_one_pass(exported, tmp_path):
    """An export written before extend.onnx existed still runs: the whole prompt in one prefill."""
    import shutil

    _, out, _, model = exported
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "extend.onnx").unlink()
    gen = OnnxGenerator(old, prefill_chunk=4)
    assert gen.extend_session is None and gen.prefill_chunk is None
    ids = _ids(1, 11, model.arch.vocab_size, seed=4)
    logits, _ = gen.prefill(ids.numpy())
    assert logits.shape == (1, 11, model.arch.vocab_size)
    assert gen.generate(ids.numpy(), 4).tolist() == generate(model, ids, max_new_tokens=4).tolist()


# ---- TensorRT operator check --------------------------------------------------------------------


def _graph(nodes, inputs, outputs, initializers=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("custom", 1)])


def test_check_graph_reports_what_tensorrt_refuses():
    def f(name, elem=TensorProto.FLOAT, shape=(2, 3)):
        return helper.make_tensor_value_info(name, elem, list(shape))

    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="unique"),  # "N" in the matrix
        helper.make_node("CumSum", ["x", "axis"], ["c"], name="cumsum"),  # axis is a graph input, not an initializer
        helper.make_node("CumSum", ["x", "axis_init"], ["c2"], name="cumsum_ok"),
        helper.make_node("TopK", ["x", "k"], ["tv", "ti"], name="topk", sorted=0),
        helper.make_node("Add", ["d", "d"], ["dd"], name="add_double"),  # DOUBLE is not in Add's types
        helper.make_node("Frobnicate", ["x"], ["fz"], name="fro", domain="custom"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
    ]
    inits = [helper.make_tensor("axis_init", TensorProto.INT64, [], [1]), helper.make_tensor("k", TensorProto.INT64, [1], [2])]
    model = _graph(nodes, [f("x"), f("axis", TensorProto.INT64, ()), f("d", TensorProto.DOUBLE),
                           f("w", TensorProto.UINT16)],  # a graph input of a type TensorRT lacks
                   [f("u", shape=(None,)), f("c"), f("c2"), f("tv", shape=(2, 2)), f("ti", TensorProto.INT64, (2, 2)),
                    f("dd", TensorProto.DOUBLE), f("fz"), f("r")], inits)
    report = trt.check_graph(model)
    by_op = {}
    for u in report["unsupported"]:
        by_op.setdefault(u["op"], []).append(u)
    assert set(by_op) == {"Unique", "CumSum", "TopK", "Add", "Frobnicate", "graph I/O"}
    assert by_op["CumSum"][0]["nodes"] == ["cumsum"] and "initializer" in by_op["CumSum"][0]["reason"]
    assert "sorted" in by_op["TopK"][0]["reason"]
    assert "DOUBLE" in by_op["Add"][0]["reason"]
    assert "custom domain" in by_op["Frobnicate"][0]["reason"]
    assert by_op["graph I/O"][0]["nodes"] == ["w"]
    assert report["ok"] is False and report["opset_supported"] is True
    assert report["ops"]["CumSum"] == 2 and report["nodes"] == len(nodes)


def test_check_graph_refuses_an_opset_beyond_tensorrt_10():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    report = trt.check_graph(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=21))
    assert report["opset"] == 21 and not report["opset_supported"] and not report["ok"]
    ok = trt.check_graph(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=18))
    assert ok["ok"] and ok["unsupported"] == []


def test_cli_check_only_exits_1_on_an_unsupported_operator(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    for name, op in (("prefill.onnx", "Unique"), ("decode.onnx", "Relu")):
        onnx.save(_graph([helper.make_node(op, ["x"], ["y"], name=f"my_{op}")], [x], [y]), str(tmp_path / name))
    r = runner.invoke(app, ["export", str(tmp_path), "--check-only"])
    assert r.exit_code == 1 and "Unique x1: not supported" in r.stdout and "unsupported: Unique" in r.stdout
    r = runner.invoke(app, ["export", str(tmp_path), "--check-only", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["unsupported_ops"] == ["Unique"]


def test_op_table_is_the_tensorrt_10_matrix():
    table = trt.load_op_table()
    assert table["meta"]["max_opset"] == 20 and "onnx-tensorrt" in table["meta"]["source"]
    ops = table["ops"]
    assert len(ops) > 150 and ops["Unique"]["supported"] is False and ops["CumSum"]["const_inputs"] == [1]
    assert all(set(row) <= {"supported", "types", "notes", "const_inputs", "attrs", "forbidden_attrs", "max_outputs"}
               for row in ops.values())


# ---- engines: the trtexec script where TensorRT is absent, the real build where it is not --------


@pytest.mark.heavy
def test_trtexec_script_and_engine_meta(exported, tmp_path, monkeypatch):
    _, out, _, _ = exported
    work = tmp_path / "e"
    work.mkdir()
    for name in ("prefill.onnx", "decode.onnx"):
        (work / name).write_bytes((out / name).read_bytes())
    monkeypatch.setattr(trt, "tensorrt_available", lambda: (False, "the tensorrt Python package is not installed"))
    settings = trt.engine_settings(get_profile("orin-nano-8gb"), max_batch=4, max_context=2048)
    meta = trt.build_or_script(work, settings)
    script = (work / "build_engines.sh").read_text()
    assert meta["built"] is False and "not installed" in meta["reason"] and meta["script"] == "build_engines.sh"
    assert json.loads((work / "engine_meta.json").read_text()) == meta
    ws = max(256 << 20, get_profile("orin-nano-8gb").runtime_overhead_bytes // 2)
    assert settings.precision == "bf16" and settings.workspace_bytes == ws
    assert script.count(f"--memPoolSize=workspace:{ws >> 20} ") == 2 and script.count("--bf16") == 2  # MiB
    commands = script.split('"$TRTEXEC"')[1:]
    assert len(commands) == 2
    for graph, cmd in zip(("prefill.onnx", "decode.onnx"), commands):
        assert f"--onnx={graph}" in cmd
        dims = trt.input_dims(work / graph)
        for flag, k in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
            spec = re.search(rf"--{flag}=(\S+)", cmd).group(1).strip("'")
            shapes = dict(item.split(":") for item in spec.split(","))
            assert set(shapes) == set(dims)  # every input (all are dynamic: batch at least)
            for name, shape in dims.items():
                got = [int(v) for v in shapes[name].split("x")]
                assert len(got) == len(shape)
                for d, v in zip(shape, got):
                    if d == "batch":
                        assert v == (1, settings.opt_batch, 4)[k]
                    elif d == "seq":
                        assert v == (1, settings.opt_seq, 2048)[k]
                    elif d == "past":
                        assert v == (1, settings.opt_seq, 2047)[k]
                    else:
                        assert v == d
    assert meta["shapes"]["decode.engine"]["input_ids"] == {"min": "1x1", "opt": f"{settings.opt_batch}x1", "max": "4x1"}


def test_engine_settings():
    from elastic.profiles.target import Target

    assert trt.engine_settings(get_profile("orin-nano-8gb"), precision="fp16").precision == "fp16"
    assert trt.engine_settings(Target.from_profile(get_profile("rtx-4090"))).precision == "bf16"
    generic = trt.engine_settings(None)  # no device given: nothing is detected, generic settings
    assert (generic.device, generic.precision, generic.workspace_bytes) == (trt.GENERIC, "fp16", trt.GENERIC_WORKSPACE)
    from elastic.slicer.errors import ElasticError

    assert trt.engine_settings("rtx-4090") == trt.engine_settings(get_profile("rtx-4090"))  # a table lookup
    with pytest.raises(TypeError, match="resolve_target"):
        trt.engine_settings(4090)
    with pytest.raises(ElasticError, match="CPU host"):
        trt.engine_settings(get_profile("cpu"))
    with pytest.raises(ElasticError, match="precision"):
        trt.engine_settings(get_profile("rtx-4090"), precision="int3")


@pytest.mark.heavy
def test_engine_build_calls_the_tensorrt_api(exported, tmp_path, monkeypatch):
    """The TensorRT path without TensorRT: a stand-in module records the calls of the documented
    TensorRT 10 Python API that build_or_script makes (the real build is the GPU test below)."""
    import sys
    import types

    _, out, _, model = exported
    calls = {"shapes": {}, "flags": [], "pool": None, "parsed": []}

    class Network:
        pass

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"].append(Path(path).name)
            return True

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["shapes"][name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    fake = types.SimpleNamespace(__version__="10.3.0", Logger=Logger, Builder=Builder, OnnxParser=Parser,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
                                 BuilderFlag=types.SimpleNamespace(FP16="fp16", BF16="bf16"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt, "tensorrt_available", lambda: (True, "10.3.0"))
    monkeypatch.setattr(trt, "_device_info", lambda: {"name": "Orin (stand-in)", "compute_capability": "8.7"})
    work = tmp_path / "e"
    work.mkdir()
    for name in ("prefill.onnx", "decode.onnx"):
        (work / name).write_bytes((out / name).read_bytes())
    settings = trt.engine_settings(get_profile("orin-nano-8gb"), max_context=1024)
    meta = trt.build_or_script(work, settings)
    assert meta["built"] is True and meta["tensorrt"] == "10.3.0" and meta["script"] is None
    assert (work / "prefill.engine").read_bytes() == b"engine" and (work / "decode.engine").read_bytes() == b"engine"
    assert calls["parsed"] == ["prefill.onnx", "decode.onnx"] and calls["flags"] == ["bf16", "bf16"]
    assert calls["pool"] == ("workspace", settings.workspace_bytes)
    assert set(calls["shapes"]) == set(trt.input_dims(work / "decode.onnx")) | {"input_ids"}
    keys = [n for n in calls["shapes"] if n.startswith("past_key.")]  # none when a budget dropped all attention
    assert all(calls["shapes"][k][0][2] == 1 and calls["shapes"][k][2][2] == 1023 for k in keys)
    assert keys or not any(layer.kind == "attention" for layer in model.arch.layers)
    assert not (work / "build_engines.sh").exists()


def _has_tensorrt():
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _has_tensorrt(), reason="needs the tensorrt Python package")
def test_tensorrt_engine_build(tmp_path):
    import tensorrt

    model_dir = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "model", budget="50%").out
    s = export_model(model_dir, tmp_path / "out", format="tensorrt", precision="fp16",
                     max_context=256).to_json()
    meta = s["tensorrt"]
    assert meta["built"] is True and meta["tensorrt"] == tensorrt.__version__ and meta["script"] is None
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    for name in ("prefill.engine", "decode.engine"):
        engine = runtime.deserialize_cuda_engine((tmp_path / "out" / name).read_bytes())
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        assert "input_ids" in names and "logits" in names


# ---- external data -------------------------------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_every_graph_references_one_weights_file(tmp_path, budget):
    """At every size: the weights are stored once, in weights.bin, and both graphs point at the same
    bytes for the same initializer; nothing but small folded constants stays inside a graph."""
    from elastic.export.weights import external_initializers

    model_dir = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "model", budget=budget).out
    s = export_model(model_dir, tmp_path / "out").to_json()
    out = tmp_path / "out"
    assert s["external_data"] is True and "weights.bin" in s["files"] and s["parity"]["ok"]
    params = sum(p.numel() * 4 for p in load_model(model_dir).parameters())
    assert params <= (out / "weights.bin").stat().st_size < 1.05 * params + 64 * 1024  # once (+ alignment)
    pre, dec, ext = (external_initializers(out / name) for name in ("prefill.onnx", "decode.onnx", "extend.onnx"))
    assert pre and dec and all(pre[n] == dec[n] for n in pre.keys() & dec.keys())
    assert ext and all(pre[n] == ext[n] for n in pre.keys() & ext.keys())
    for name in ("prefill.onnx", "decode.onnx", "extend.onnx"):
        inits = onnx.load(str(out / name), load_external_data=False).graph.initializer
        assert {e.value for t in inits for e in t.external_data if e.key == "location"} == {"weights.bin"}
        assert all(t.data_location == TensorProto.EXTERNAL for t in inits if t.ByteSize() > 2048)
    stored = {n: v for n, v in {**pre, **dec, **ext}.items()}
    assert sum(length for _, length, _, _ in stored.values()) >= 0.99 * params  # every weight, once


@pytest.mark.slow
def test_export_beyond_the_2gb_protobuf_limit(tmp_path):
    """A model whose float32 weights exceed 2 GiB: graphs with external data, checked and compared."""
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.nn.model import build_model, init_weights, save_model

    arch = Arch.from_config({  # embeddings + LM head alone: 2 x 70,000 x 4096 float32 = 2.29 GB
        "vocab_size": 70_000, "hidden_size": 4096, "hybrid_override_pattern": "M*-", "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024, "mamba_num_heads": 8,
        "mamba_head_dim": 64, "n_groups": 1, "ssm_state_size": 16, "conv_kernel": 4, "chunk_size": 16,
        "layer_norm_epsilon": 1e-5})
    model = init_weights(build_model(arch, seed=None), seed=0)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes > 2**31
    save_model(model, tmp_path / "big")
    del model
    s = export_model(tmp_path / "big", tmp_path / "out").to_json()
    assert s["external_data"] is True and s["parity"]["ok"] and s["unsupported_ops"] == []
    assert (tmp_path / "out" / "weights.bin").stat().st_size > 0.99 * nbytes
    assert math.isfinite(s["parity"]["prefill_max_abs_diff"])


# ---- CLI -------------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_cli_export_json_and_generate(tmp_path):
    model_dir = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "model", budget="50%").out
    out = tmp_path / "out"
    r = runner.invoke(app, ["export", str(model_dir), "--out", str(out), "--format", "all", "--target",
                            "orin-nano-8gb", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for key in ("out", "files", "opset", "unsupported_ops", "parity", "tensorrt", "tensorrt_check"):
        assert key in info
    assert info["opset"] == 18 and info["unsupported_ops"] == [] and info["parity"]["prefill_max_abs_diff"] <= TOL
    assert {"prefill.onnx", "decode.onnx", "README.md", "engine_meta.json", "build_engines.sh"} <= set(info["files"])
    assert all((out / f).is_file() for f in info["files"])
    assert info["tensorrt"]["script"] == "build_engines.sh"  # format "all": the script even when engines are built
    assert json.loads((out / "export_manifest.json").read_text()) == info

    r = runner.invoke(app, ["export", str(out), "--check-only", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["unsupported_ops"] == []

    runs = {}
    for backend, path in (("torch", model_dir), ("onnx", out)):
        r = runner.invoke(app, ["generate", str(path), "Hello", "--backend", backend, "-n", "6", "--json"])
        assert r.exit_code == 0, r.output
        runs[backend] = json.loads(r.stdout)
        assert runs[backend]["tokens_per_s"] > 0
    assert runs["torch"]["tokens"] == runs["onnx"]["tokens"]
    assert runs["onnx"]["prompt_tokens"] == runs["torch"]["prompt_tokens"] > 0

    r = runner.invoke(app, ["export", str(model_dir), "--out", str(out)])  # exists, no --force
    assert r.exit_code == 2 and "already exists" in r.output


def test_cli_errors_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "config.json" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["empty"]
    r = runner.invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["generate", str(tmp_path / "empty"), "hi", "--backend", "onnx"])
    assert r.exit_code == 2 and "not an ONNX export" in r.output
    r = runner.invoke(app, ["export", str(DEMO_CHECKPOINT)])
    assert r.exit_code == 2 and "--out" in r.output


def test_missing_onnx_packages_is_a_fix_it_message(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    r = runner.invoke(app, ["export", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "onnxscript" in r.output and "elastic[onnx]" in r.output
    assert not (tmp_path / "out").exists()
