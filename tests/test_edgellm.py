"""TensorRT Edge-LLM bundles: what is refused before any work, the bundle's plumbing (with a stand-in
exporter), and, marked slow, Edge-LLM's real exporter on a stock and a padded Puzzle slice of the
demo, whose config.json widths must be the slice's (the oracle: Edge-LLM's own output).
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from elastic.export import edgellm
from elastic.export.edgellm import INSTALL, export_edgellm, find_exporter
from elastic.profiles.errors import ProfileError
from elastic.slicer.errors import ConfigError, ElasticError, MissingDependencyError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.planning.describe import default_checkpoint
from elastic.slicer.slice import slice_checkpoint

DEMO = default_checkpoint()
MOE_DEMO = Path(DEMO).parent / "moe_demo_checkpoint"


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    spec = root / "ext.json"  # per-layer Mamba sizes: elastic's extension form
    spec.write_text(json.dumps({"hidden_size": 64, "layers": [{"index": 0, "mamba_num_heads": 4},
                                                              {"index": 2, "mamba_head_dim": 12}]}))
    return {
        "100%": slice_checkpoint(DEMO, root / "s100", budget="100%", dtype="float16").out,
        "50%": slice_checkpoint(DEMO, root / "s50", budget="50%").out,  # Puzzle form, float32, no attention
        "ext": slice_checkpoint(DEMO, root / "ext", spec=spec).out,
        "moe": slice_checkpoint(MOE_DEMO, root / "moe", budget="100%", dtype="float16").out,
    }


REFUSALS = [  # (slice, target, precision, error type, words the message must hold)
    ("moe", "orin-nx-16gb", "auto", ConfigError, ["MoE layers", "only as NVFP4", "has no NVFP4", "llama.cpp"]),
    ("moe", "thor-128gb", "fp16", ConfigError, ["MoE layers", "only as NVFP4", "ask for nvfp4"]),
    ("ext", "orin-nx-16gb", "auto", ConfigError, ["one size per layer kind", "gated RMSNorm", "layer 2: 8 heads x 12"]),
    ("100%", "rtx-4090", "auto", ProfileError, ["does not run on GeForce RTX 4090", "Jetson Orin (sm_87)", "GGUF"]),
    ("100%", "cpu", "auto", ProfileError, ["does not run on CPU host"]),
    ("100%", "orin-nano-8gb", "fp8", ConfigError, ["runs fp16, int8, int4 on Jetson Orin Nano 8GB, not fp8"]),
    ("100%", "thor-128gb", "bf16", ConfigError, ["fp16", "FP16Linear"]),
    ("100%", "agx-orin-64gb", "int4", ConfigError, ["groups of 128", "in_proj: 328 x 64"]),
]


@pytest.mark.parametrize("name,target,precision,kind,words", REFUSALS,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in REFUSALS])
def test_refused_before_any_work(slices, tmp_path, monkeypatch, name, target, precision, kind, words):
    monkeypatch.setattr(edgellm, "find_exporter", lambda: pytest.fail("the exporter was looked for"))
    with pytest.raises(kind) as e:
        export_edgellm(slices[name], tmp_path / "out", target=target, precision=precision)
    text = e.value.render()
    assert all(w in text for w in words), text
    assert e.value.hint is not None
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_missing_exporter_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(edgellm.EXPORTER_ENV, "no-such-edgellm-exporter")
    with pytest.raises(MissingDependencyError) as e:
        find_exporter()
    assert "not a command here" in e.value.message and INSTALL in e.value.message
    monkeypatch.delenv(edgellm.EXPORTER_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(edgellm, "VENV", ".no-such-venv")
    with pytest.raises(MissingDependencyError) as e:
        find_exporter()
    assert "pip install torch==2.13.0 'tensorrt-edgellm[export]==0.11.0'" in e.value.message
    assert "transformers 5.14.1" in e.value.message


FAKE = '''import json, sys, pathlib
model, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cfg = json.loads((model / "config.json").read_text())
if "{fail}" == "yes":
    print("Traceback ...\\nValueError: something Edge-LLM refused"); sys.exit(1)
assert (model / "chat_template.jinja").is_file(), "no chat template"
(out / "llm").mkdir(parents=True)
kinds = cfg["hybrid_override_pattern"]
(out / "llm" / "config.json").write_text(json.dumps(dict(
    edgellm_version="0.11.0", hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
    num_hidden_layers=len(kinds), vocab_size=cfg["vocab_size"], num_attention_layers=kinds.count("*"),
    num_linear_attn_layers=kinds.count("M"), recurrent_state_num_heads=cfg["mamba_num_heads"],
    recurrent_state_head_dim=cfg["mamba_head_dim"], recurrent_state_size=cfg["ssm_state_size"],
    recurrent_state_num_groups=cfg["n_groups"],
    conv_dim=cfg["mamba_num_heads"] * cfg["mamba_head_dim"] + 2 * cfg["n_groups"] * cfg["ssm_state_size"])))
(out / "llm" / "model.onnx").write_bytes(b"onnx")
print("Export complete", sys.argv[1:])
'''


def _fake_exporter(tmp_path, monkeypatch, fail=False):
    script = tmp_path / "fake_export.py"
    script.write_text(FAKE.replace("{fail}", "yes" if fail else "no"))
    monkeypatch.setenv(edgellm.EXPORTER_ENV, f"{sys.executable} {script}")


def test_bundle_layout_with_a_stand_in_exporter(slices, tmp_path, monkeypatch):
    """The plumbing around the exporter: the model it is given (stock, fp16, with a chat template),
    the bundle's files, checksums that verify, the manifest and the README's commands."""
    _fake_exporter(tmp_path, monkeypatch)
    r = export_edgellm(slices["50%"], tmp_path / "bundle", target="orin-nx-16gb", max_context=2048)
    m = r.manifest
    assert (m["precision"], m["device"]["platform"], m["device"]["sm"]) == ("fp16", "jetson-orin", 87)
    assert [(p["from"], p["to"]) for p in m["form"]["padding"]] == [(128, 256), (192, 256)]
    assert m["form"]["cost"]["bytes"] == 2 * m["form"]["cost"]["parameters"]  # fp16 zeros
    assert m["chat_template"]["source"] == "elastic" and any("chat template" in w for w in m["warnings"])
    assert any("no attention layer" in w for w in m["warnings"])
    assert m["edgellm"]["config"]["intermediate_size"] == 256
    files = {str(p.relative_to(r.out)) for p in r.out.rglob("*") if p.is_file()}
    assert {"llm/config.json", "llm/model.onnx", "README.md", "SHA256SUMS", "input.json", "export_manifest.json",
            "edgellm_export.log"} <= files
    for line in (r.out / "SHA256SUMS").read_text().splitlines():  # as `sha256sum -c` checks it
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((r.out / name).read_bytes()).hexdigest() == digest
    readme = (r.out / "README.md").read_text()
    assert "-DEMBEDDED_TARGET=jetson-orin" in readme and "--maxInputLen 2048" in readme
    assert "./build/examples/llm/llm_build" in readme and "./build/examples/llm/llm_inference" in readme
    request = json.loads((r.out / "input.json").read_text())
    assert request["requests"][0]["messages"][0]["role"] == "user"
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())  # the staging copy is gone


def test_exporter_failure_is_quoted_and_nothing_is_kept(slices, tmp_path, monkeypatch):
    _fake_exporter(tmp_path, monkeypatch, fail=True)
    with pytest.raises(ElasticError) as e:
        export_edgellm(slices["100%"], tmp_path / "bundle", target="thor-128gb")
    assert "exporter failed (exit 1): ValueError: something Edge-LLM refused" in e.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake_export.py"]


def test_cli_edgellm_and_help(slices, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from elastic.cli.main import app

    _fake_exporter(tmp_path, monkeypatch)
    r = CliRunner().invoke(app, ["export", str(slices["50%"]), "--format", "edgellm", "--target", "thor-128gb",
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "bundle for Jetson AGX Thor" in r.output and "layer 3 intermediate_size 128 -> 256" in r.output
    assert "llm_build" in r.output and "elastic added a plain 'role: content' template" in r.output
    r = CliRunner().invoke(app, ["export", str(slices["moe"]), "--format", "edgellm", "--target", "orin-nano-8gb",
                                 "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 2 and "only as NVFP4" in json.loads(r.stdout)["error"]
    text = CliRunner().invoke(app, ["export", "--help"]).output
    text = " ".join(text.replace("│", " ").split())  # rich wraps the help in a box
    assert "edgellm" in text and "no deployment runtime loads" in text and "graphs + engines" not in text


# ---- Edge-LLM's own exporter (item 4 of issue 24) -----------------------------------------------------

def _real_exporter():
    try:
        return find_exporter()
    except MissingDependencyError as e:
        pytest.skip(f"TensorRT Edge-LLM's exporter is not installed ({e.message[:60]}...)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["100%", "50%"])
def test_edgellm_exporter_takes_the_slice_and_reports_its_widths(slices, tmp_path, name):
    """A stock slice (the demo's 100%) and a Puzzle slice padded to one width (the demo's 50%):
    Edge-LLM's exporter writes its ONNX and a config.json whose sizes are the slice's."""
    _real_exporter()
    r = export_edgellm(slices[name], tmp_path / "bundle", target="orin-nx-16gb")
    llm = json.loads((r.out / "llm" / "config.json").read_text())
    arch = Arch.from_file(slices[name])  # the slice as cut
    mlp = [x.intermediate_size for x in arch.layers if x.kind == "mlp"]
    mamba = next(x for x in arch.layers if x.kind == "mamba")
    assert llm["intermediate_size"] == max(mlp)  # one width: the largest (padded) one
    assert (llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]) == (arch.hidden_size, len(arch.layers),
                                                                                   arch.vocab_size)
    assert (llm["recurrent_state_num_heads"], llm["recurrent_state_head_dim"]) == (mamba.mamba_num_heads,
                                                                                   mamba.mamba_head_dim)
    assert llm["num_attention_layers"] == sum(x.kind == "attention" for x in arch.layers)
    assert (r.out / "llm" / "model.onnx").stat().st_size > 0 and (r.out / "llm" / "model.onnx.data").is_file()
    # the 100% is stock already; the 50%'s narrower MLPs were padded to the widest
    assert {p["from"] for p in r.manifest["form"]["padding"]} == set(mlp) - {max(mlp)}
    assert (name == "100%") == (r.manifest["form"]["padding"] == [])


@pytest.mark.slow
def test_edgellm_exporter_takes_a_padded_fp8_slice_for_thor(slices, tmp_path):
    """Quantized on the way (Model Optimizer FP8 of the padded float slice), exported by Edge-LLM."""
    _real_exporter()
    pytest.importorskip("modelopt")
    r = export_edgellm(slices["50%"], tmp_path / "bundle", target="thor-128gb", precision="fp8")
    assert r.manifest["precision"] == "fp8" and r.manifest["quantization"]["quant_algo"] == "FP8"
    assert r.manifest["form"]["cost"]["bytes"] == r.manifest["form"]["cost"]["parameters"]  # one byte per zero
    llm = json.loads((r.out / "llm" / "config.json").read_text())
    assert llm["intermediate_size"] == 256 and llm["hidden_size"] == 48


def test_the_device_comes_resolved_from_the_front_end():
    """edgellm_device takes a name or a profile and never detects: None (no device) and a profile
    that is no Jetson are refused; a Jetson profile object is the same device as its name."""
    from elastic.profiles.devices import get_profile

    with pytest.raises(ProfileError, match="name the device the bundle is for"):
        edgellm.edgellm_device(None)
    with pytest.raises(ProfileError, match="not a Jetson elastic knows"):
        edgellm.edgellm_device(get_profile("rtx-4090"))
    assert edgellm.edgellm_device(get_profile("orin-nx-16gb")) == edgellm.edgellm_device("orin-nx-16gb")
