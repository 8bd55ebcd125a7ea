"""Issue 25 items 3-4: quality is measured, not assumed. The size-curve record (``size_curve.json``):
judging against hand-computed verdicts, the demo's shipped record against a fresh measurement,
``elastic slice`` refusing a size measured outside its trained neighbours, ``plan --fit exact``
showing the quality measure, and writing the record only where asked."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import ElasticConfig, resolve_budget
from elastic.slicer.formats.size_curve import (CURVE_NAME, CurvePoint, OffCurveSize, SizeCurve, curve_target,
                                               fingerprint, judge, read_curve, refuse_off_curve, write_curve)
from elastic.slicer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slicer" / "demo_checkpoint"
EXAMPLE_12B = ROOT / "examples" / "nemotron-elastic-12b"
runner = CliRunner()


def point(name, params, ppl, trained=False):
    return CurvePoint((name,), trained, params, ppl, 0.0, {"hidden_size": params, "layers": []}, "test")


def synthetic() -> SizeCurve:
    """Trained 100 (ppl 10), 50 (ppl 20); between: 75 at 15 (between), 60 at 25 (worse than the
    smaller trained budget), 90 at 9 (better than the larger one)."""
    return SizeCurve({}, {}, (point("T100", 100, 10.0, True), point("S90", 90, 9.0), point("S75", 75, 15.0),
                              point("S60", 60, 25.0), point("T50", 50, 20.0, True)))


@pytest.fixture
def demo(tmp_path):
    shutil.copytree(DEMO, tmp_path / "demo")
    return tmp_path / "demo"


def shipped() -> SizeCurve:
    curve, note = read_curve(DEMO)
    assert curve is not None, note
    return curve


# ---- the record's verdicts, against the definition worked by hand --------------------------------------


def test_verdicts_by_hand():
    c = synthetic()
    verdicts = {p.name: judge(c, p.spec, p.parameters).verdict for p in c.points}
    assert verdicts == {"T100": "trained", "S90": "outside", "S75": "between", "S60": "outside", "T50": "trained"}
    assert [p.name for p in c.outside()] == ["S90", "S60"]
    q = judge(c, {"hidden_size": 80, "layers": []}, 80)  # not measured: between S90 (9) and S75 (15)
    assert q.verdict == "interpolated" and q.interpolated == pytest.approx(15 + (80 - 75) / (90 - 75) * (9 - 15))
    assert [n.name for n in q.neighbours] == ["T100", "T50"]
    assert judge(c, {"hidden_size": 40, "layers": []}, 40).verdict == "not measured"  # below every measured size
    assert judge(None, {}, 1, "no record").words() == "not measured (no record)"


def test_refusal_names_the_perplexities_and_the_neighbours():
    c = synthetic()
    p = c.points[3]  # S60: 25.0, worse than T50's 20.0
    with pytest.raises(OffCurveSize) as e:
        refuse_off_curve("60%", judge(c, p.spec, p.parameters))
    text = e.value.render()
    assert "25.0000" in text and "T50's 20.0000" in text and "T100" in text and "10.0000" in text
    assert e.value.hint.setting == "off_curve"
    refuse_off_curve("75%", judge(c, c.points[2].spec, 75))  # between: no error


# ---- the shipped record: measured, and what slicing does with it ---------------------------------------


@pytest.mark.heavy  # measures the demo curve again
def test_shipped_record_matches_a_fresh_measurement(tmp_path):
    """The record was measured, not written by hand: slicing one of its sizes again and evaluating
    it with the record's settings gives its perplexity."""
    from elastic.slicer.quantize.evaluate import perplexity
    from elastic.slicer.slice import slice_checkpoint

    curve = shipped()
    p = next(p for p in curve.points if not p.trained)
    r = slice_checkpoint(DEMO, tmp_path / "s", budget=p.sizes[0], allow_off_curve=True)
    assert r.manifest["spec"] == p.spec and r.parameters == p.parameters
    ppl = perplexity(tmp_path / "s", seq_len=curve.evaluation["seq_len"], max_windows=curve.evaluation["windows"])
    assert ppl.tokens == curve.evaluation["tokens"]
    assert ppl.perplexity == pytest.approx(p.perplexity, rel=1e-5)


def test_shipped_record_covers_every_size_and_the_trained_budgets():
    curve = shipped()
    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    sizes = {s for p in curve.points for s in p.sizes}
    assert sizes == {b.name for b in ec.budgets} | {f"{s}%" for s in range(40, 101, 5)}
    for p in curve.points:  # every size names the architecture slicing resolves it to
        for s in p.sizes:
            assert resolve_budget(DEMO, ec, parent, s)[0].to_json(parent) == p.spec
    trained = sorted((p for p in curve.points if p.trained), key=lambda p: p.parameters)
    for p in curve.points:  # outside, recomputed from the rows alone
        if p.trained:
            continue
        larger = [t for t in trained if t.parameters >= p.parameters][:1]
        smaller = [t for t in trained if t.parameters < p.parameters][-1:]
        off = any(p.perplexity < t.perplexity for t in larger) or any(p.perplexity > t.perplexity for t in smaller)
        assert (p in curve.outside()) == off


def test_slice_refuses_a_size_measured_outside(tmp_path):
    curve = shipped()
    if not curve.outside():
        pytest.skip("every in-between size of the demo measures between its neighbours")
    bad = curve.outside()[0]
    r = runner.invoke(app, ["slice", "--budget", bad.sizes[0], "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    assert f"{bad.perplexity:.4f}" in r.output and "--allow-off-curve" in r.output
    for n in curve.trained_neighbours(bad.parameters):
        assert f"trained budget {n.name}: {n.parameters:,} parameters, perplexity {n.perplexity:.4f}" in r.output
    r = runner.invoke(app, ["slice", "--budget", bad.sizes[0], "--out", str(tmp_path / "x"), "--allow-off-curve",
                            "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "x" / "slice_manifest.json").read_text())
    assert m["quality"]["verdict"] == "outside" and m["quality"]["perplexity"] == bad.perplexity
    assert any("off the measured curve" in w for w in m["warnings"])


def test_generate_and_serve_refuse_a_size_measured_outside_as_slice_does():
    """A budget run on the resident parent (elastic generate --budget, elastic serve --budgets)
    follows the same record: refused without --allow-off-curve, run with it."""
    from elastic.slicer.nn.budget import ResidentParent

    curve = shipped()
    if not curve.outside():
        pytest.skip("every in-between size of the demo measures between its neighbours")
    bad = curve.outside()[0].sizes[0]
    r = runner.invoke(app, ["generate", "-c", str(DEMO), "--budget", bad, "-n", "2", "def"])
    assert r.exit_code == 2 and "--allow-off-curve" in r.output and "is not offered" in r.output
    r = runner.invoke(app, ["generate", "-c", str(DEMO), "--budget", bad, "-n", "2", "def", "--allow-off-curve",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["new_tokens"] == 2
    with pytest.raises(OffCurveSize):
        ResidentParent(DEMO).spec(bad)
    assert ResidentParent(DEMO, allow_off_curve=True).spec(bad)[0].parameters(Arch.from_file(DEMO)) == \
        curve.outside()[0].parameters


def test_slice_of_a_measured_size_says_its_perplexity(tmp_path):
    curve = shipped()
    good = next((p for p in curve.points if not p.trained and p not in curve.outside()), None)
    if good is None:
        pytest.skip("no in-between size of the demo measures between its neighbours")
    r = runner.invoke(app, ["slice", "--budget", good.sizes[0], "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "x" / "slice_manifest.json").read_text())
    assert m["trained"] is False and m["quality"]["verdict"] == "between"
    assert m["quality"]["perplexity"] == good.perplexity
    assert f"quality measured perplexity {good.perplexity:.3f}" in r.output


def test_a_size_never_measured_says_so(demo, tmp_path):
    from elastic.slicer.slice import slice_checkpoint

    parent = Arch.from_file(demo)
    curve = shipped()
    total = parent.param_counts()["total"]
    measured = {json.dumps(p.spec, sort_keys=True) for p in curve.points}
    size = next(f"{s}%" for s in range(41, 100) if json.dumps(resolve_budget(demo, ElasticConfig.read(demo, parent),
                parent, f"{s}%")[0].to_json(parent), sort_keys=True) not in measured)
    m = slice_checkpoint(demo, tmp_path / "s", budget=size).manifest
    assert m["trained"] is False and m["quality"]["verdict"] in ("interpolated", "not measured")
    assert any("not a trained budget" in w and "not measured" in w for w in m["warnings"])
    assert total  # (the parent is larger than every size asked for)


def test_another_version_of_the_checkpoint_ignores_the_record(demo, tmp_path):
    from elastic.slicer.slice import slice_checkpoint

    bad = shipped().outside()
    ec = ElasticConfig.read(demo, Arch.from_file(demo))
    data = json.loads((demo / "elastic_config.json").read_text())
    (demo / "elastic_config.json").write_text(json.dumps(data, indent=2))  # same content, other bytes
    curve, note = read_curve(demo, ec.router_file)
    assert curve is None and "another version" in note
    if bad:  # no longer refused: nothing vouches either way
        m = slice_checkpoint(demo, tmp_path / "s", budget=bad[0].sizes[0]).manifest
        assert m["quality"]["verdict"] == "not measured" and "another version" in m["quality"]["note"]


def test_trained_budget_manifest_has_its_measured_perplexity(tmp_path):
    from elastic.slicer.slice import slice_checkpoint

    p = next(p for p in shipped().points if p.trained and "75%" in p.sizes)
    m = slice_checkpoint(DEMO, tmp_path / "s", budget="75%").manifest
    assert m["quality"]["verdict"] == "trained" and m["quality"]["perplexity"] == p.perplexity
    assert not any("trained budget" in w for w in m["warnings"])


# ---- plan --fit exact: the quality measure beside the exact fit --------------------------------------


def test_plan_exact_fit_shows_the_quality_measure():
    r = runner.invoke(app, ["plan", "--target", "orin-nano-8gb", "--fit", "exact", "--json"])
    assert r.exit_code == 0, r.output
    e = json.loads(r.output)["exact_fit"]
    curve = shipped()
    p = curve.point(e["spec"])  # the demo fits whole: the parent, measured as 100%
    assert p is not None and e["quality"]["verdict"] == "trained" and e["quality"]["perplexity"] == p.perplexity
    r = runner.invoke(app, ["plan", "--target", "orin-nano-8gb", "--fit", "exact"])
    assert f"quality     measured perplexity {p.perplexity:.3f}" in r.output


def test_plan_exact_fit_between_sizes_interpolates(demo):
    """A device that holds only part of the demo: the exact fit's quality is its measured point,
    or the straight line between the measured points on either side, computed here."""
    from elastic.profiles.devices import Capability
    from elastic.slicer.planning.fit import Target, plan
    from elastic.slicer.planning.memory import Workload, footprint
    from elastic.slicer.formats.spec import SliceSpec

    parent = Arch.from_file(demo)
    ec = ElasticConfig.read(demo, parent)
    w = Workload(context=256, dtype="float32", weights="float32")
    mid = (footprint(SliceSpec.from_json(ec.resolved["75%"], parent).child_arch(parent), w, 0)["total"]
           + footprint(parent, w, 0)["total"]) // 2
    t = Target("test", "cpu", mid, 0, caps=Capability(True, True, False, False, False, False),
               unified=False, source="profile")  # bf16 and fp16, nothing quantized
    e = plan(demo, t, w, fit="exact").to_json()["exact_fit"]
    q, curve = e["quality"], shipped()
    p = curve.point(e["spec"])
    if p is not None:
        assert q["perplexity"] == p.perplexity
        return
    above = min((c for c in curve.points if c.parameters >= e["parameters"]), key=lambda c: c.parameters)
    below = max((c for c in curve.points if c.parameters <= e["parameters"]), key=lambda c: c.parameters)
    t_ = (e["parameters"] - below.parameters) / (above.parameters - below.parameters)
    assert q["verdict"] == "interpolated"
    assert q["interpolated"] == pytest.approx(below.perplexity + t_ * (above.perplexity - below.perplexity))
    assert {n["budget"] for n in q["neighbours"]} <= {b.name for b in ec.budgets}


def test_plan_exact_fit_without_a_record_says_not_measured():
    r = runner.invoke(app, ["plan", "-c", str(EXAMPLE_12B), "--target", "orin-nano-8gb", "--fit", "exact", "--json"])
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)["exact_fit"]["quality"]
    assert q["verdict"] == "not measured" and q["perplexity"] is None and CURVE_NAME in q["note"]


def test_an_exact_fit_off_the_curve_is_not_chosen(demo):
    from elastic.profiles.devices import Capability
    from elastic.slicer.formats.size_curve import Quality
    from elastic.slicer.planning.fit import Target, plan
    from elastic.slicer.planning.memory import Workload

    t = Target("test", "cpu", 2**40, 0, caps=Capability(True, True, False, False, False, False),
               unified=False, source="profile")  # bf16 and fp16, nothing quantized
    p = plan(demo, t, Workload(context=256), fit="exact")
    chosen = p.budget(p.chosen)
    bigger = replace(p.exact_fit, parameters=chosen.parameters + 1)
    ok = replace(p, exact_fit=replace(bigger, quality=Quality("between", bigger.parameters, 1.0)))
    assert ok.choose_exact().chosen == "exact"
    off = replace(p, exact_fit=replace(bigger, quality=Quality("outside", bigger.parameters, 99.0)))
    assert off.choose_exact().chosen == p.chosen
    assert "exact fit not chosen: measured perplexity 99.000, outside" in off.choose_exact().notes[-1]


# ---- writing the record: only where asked, never over what is there -----------------------------------


def test_measure_and_write_where_asked(demo, tmp_path):
    from elastic.slicer.planning.measure import measure_curve

    before = sorted(f.name for f in demo.iterdir())
    curve, skipped = measure_curve(demo, ["75%", "60%", "5%"], max_windows=2)
    assert sorted(f.name for f in demo.iterdir()) == before  # measuring writes nothing beside the checkpoint
    assert [s["size"] for s in skipped] == ["5%"] and len(curve.points) == 2
    assert curve.fingerprint == fingerprint(demo, "router.safetensors")
    (demo / CURVE_NAME).unlink()
    written = write_curve(curve, demo)  # a directory: DIR/size_curve.json
    assert written == demo / CURVE_NAME
    got, note = read_curve(demo)
    assert note is None and got.points == curve.points
    with pytest.raises(ConfigError, match="already there"):
        write_curve(curve, demo)
    assert json.loads(written.read_text())["sizes"] == [p.to_json() for p in curve.points]


def test_a_read_only_directory_is_refused_before_measuring(tmp_path, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match="read-only"):
        curve_target(tmp_path)
    with pytest.raises(ConfigError, match="no such directory"):
        curve_target(tmp_path / "missing" / "x.json")


def test_eval_curve_cli_refuses_before_measuring(demo):
    r = runner.invoke(app, ["eval", "-c", str(demo), "--curve", "--out", str(demo / CURVE_NAME)])
    assert r.exit_code == 2 and "already there" in r.output and "--force" in r.output
    r = runner.invoke(app, ["eval", "-c", str(demo), "--out", str(demo / "x.json")])
    assert r.exit_code == 2 and "--curve" in r.output and not (demo / "x.json").exists()
