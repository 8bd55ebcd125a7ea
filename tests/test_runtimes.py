"""Rules behind the manifest's llama.cpp claims. The converter's ("llama.cpp converter"), checked
without the converter: the Mamba head size is stated (mamba_d_head), and tokenizer_class is read
where the converter reads it (tokenizer_config.json); DESIGN.md section 9 holds the facts. The
engine's ("llama.cpp", through `elastic export --format gguf`): its refusals and the words of a
slice without attention layers (tests/test_gguf.py runs llama.cpp on the "yes" ones)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.formats.arch import Arch
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.formats.runtimes import runtime_support

runner = CliRunner()


def test_every_slice_states_its_mamba_head_size(tmp_path):
    spec = tmp_path / "spec.json"  # head channels 12: 8 heads x 12 = 96, not a multiple of 64
    layers = [{"index": i, "mamba_head_dim": 12} for i in (0, 2, 5)]
    spec.write_text(json.dumps({"hidden_size": 64, "layers": layers}))
    r = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--spec", str(spec), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["mamba_d_head"] == cfg["mamba_head_dim"] == 12
    claim = json.loads((tmp_path / "m" / "slice_manifest.json").read_text())["runtimes"]["llama.cpp converter"]
    assert "mamba_d_head" not in claim.get("why", "")  # the width divides by the stated head size


def test_tokenizer_class_is_read_from_tokenizer_config(tmp_path):
    arch = Arch.from_file(DEMO_CHECKPOINT)
    cfg = arch.to_config()
    ok = runtime_support(arch, cfg, {"tokenizer_class": "PreTrainedTokenizerFast"})["llama.cpp converter"]
    assert "tokenizer_class" not in ok.get("why", "")
    claim = runtime_support(arch, {**cfg, "tokenizer_class": "PreTrainedTokenizerFast"},
                            {"tokenizer_class": "TokenizersBackend"})["llama.cpp converter"]
    assert not claim["loads"] and "tokenizer_config.json's tokenizer_class 'TokenizersBackend'" in claim["why"]
    # and a slice of a source whose tokenizer_config says TokenizersBackend is claimed "no"
    src = tmp_path / "src"
    shutil.copytree(DEMO_CHECKPOINT, src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "TokenizersBackend"}))
    assert runner.invoke(app, ["slice", "-c", str(src), "--budget", "100%", "--out", str(tmp_path / "m")]).exit_code == 0
    claim = json.loads((tmp_path / "m" / "slice_manifest.json").read_text())["runtimes"]["llama.cpp converter"]
    assert not claim["loads"] and "TokenizersBackend" in claim["why"]


def test_the_llama_cpp_claim_follows_what_the_converter_was_seen_to_do(tmp_path):
    """bench/llama_cpp_check.py saw llama.cpp 0.3.36's converter refuse the demo tokenizer's
    pre-tokenizer: the demo's uniform slice says so; a tokenizer never checked gets a conditional yes."""
    r = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", "100%", "--out", str(tmp_path / "a"),
                            "--json"])
    claim = json.loads(r.stdout)["runtimes"]["llama.cpp converter"]
    assert not claim["loads"] and "b4a19eb91e19" in claim["why"] and "convert_hf_to_gguf_update.py" in claim["why"]
    src = tmp_path / "src"
    shutil.copytree(DEMO_CHECKPOINT, src)
    (src / "tokenizer.json").write_text(json.dumps(json.loads((src / "tokenizer.json").read_text())))  # another file
    r = runner.invoke(app, ["slice", "-c", str(src), "--budget", "100%", "--out", str(tmp_path / "b"), "--json"])
    claim = json.loads(r.stdout)["runtimes"]["llama.cpp converter"]
    assert claim["loads"] and "4.57.6" in claim["how"] and "unchecked here" in claim["how"]
    het = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", "50%", "--out", str(tmp_path / "c"),
                              "--json"])
    assert "moe_shared_expert_intermediate_size" in json.loads(het.stdout)["runtimes"]["llama.cpp converter"]["why"]


TOKENIZER_CHECK = """
import sys, transformers
kw = {"trust_remote_code": True} if sys.argv[2] == "trust" else {}
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1], **kw)
print("LOADED", type(tok).__name__, tok.encode("def main"))
"""


@pytest.mark.heavy
def test_auto_tokenizer_loads_every_demo_slice_without_a_prompt(tmp_path):
    """stdin closed, as in a script: a stock slice's tokenizer loads with no question asked; a
    remote-code form's loads with trust_remote_code=True as its manifest says (transformers 5
    loads the model config first, docs/runtime-facts.md section 4)."""
    import subprocess
    import sys

    ids = None
    for budget in ("100%", "75%", "50%"):
        out = tmp_path / budget
        assert runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", budget, "--out", str(out)]).exit_code == 0
        manifest = json.loads((out / "slice_manifest.json").read_text())
        stock = json.loads((out / "config.json").read_text())["model_type"] == "nemotron_h"
        if not stock:
            assert "AutoTokenizer needs trust_remote_code=True" in manifest["runtimes"]["transformers"]["how"]
        r = subprocess.run([sys.executable, "-c", TOKENIZER_CHECK, str(out), "plain" if stock else "trust"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "LOADED" in r.stdout, r.stderr[-2000:]
        assert "Do you wish to run the custom code" not in r.stdout + r.stderr
        got = r.stdout.split("LOADED", 1)[1]
        assert ids is None or got == ids  # one tokenizer, whatever the form
        ids = got


def test_the_llama_cpp_engine_claim_is_elastics_gguf_and_says_why_not(tmp_path):
    claims = {}
    for budget in ("100%", "50%"):
        r = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", budget,
                                "--out", str(tmp_path / budget[:-1]), "--json"])
        assert r.exit_code == 0, r.output
        claims[budget] = json.loads(r.stdout)
    yes = claims["100%"]["runtimes"]["llama.cpp"]
    assert yes["loads"] and "elastic export DIR --format gguf" in yes["how"] and "nemotron_h" in yes["how"]
    no = claims["50%"]  # the demo's 50% budget drops the one attention layer
    assert not no["runtimes"]["llama.cpp"]["loads"] and "no attention layer" in no["runtimes"]["llama.cpp"]["why"]
    assert no["runtimes"]["transformers"]["loads"] and "get_mask_sizes" in no["runtimes"]["transformers"]["how"]
    assert "get_mask_sizes" not in claims["100%"]["runtimes"]["transformers"]["how"]
    assert any("no attention layer" in w for w in no["warnings"]) and not claims["100%"]["warnings"]
    moe = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT.parent / "moe_demo_checkpoint"), "--budget", "100%",
                              "--out", str(tmp_path / "moe"), "--json"])
    engine = json.loads(moe.stdout)["runtimes"]["llama.cpp"]
    assert engine["loads"] and "nemotron_h_moe" in engine["how"]
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["n_shared_experts"] == 1
