"""The measured size curve of an elastic checkpoint (issue 25 item 4): held-out perplexity of its
trained budgets and of sizes between them, each sliced the way ``elastic slice --budget`` slices it.

An in-between size should lie between its trained neighbours (by parameters: no better than the
larger one, no worse than the smaller one). The record says which do; slicing and planning consult
it, so a size measured outside its neighbours is refused instead of offered, and a measured one says
its perplexity. It is kept in ``size_curve.json`` in the checkpoint's directory, written only by an
explicit command (``elastic eval --curve --out``, :func:`write_curve`), never beside a checkpoint
implicitly. It names the files it was measured on by their SHA-256 (config, elastic config, router):
a record of another version of the checkpoint is ignored, and says so. No torch here.

Example:
    >>> curve, note = read_curve(ckpt.root, ec.router_file)
    >>> quality = judge(curve, spec.to_json(parent), spec.parameters(parent), note)
    >>> quality.verdict, quality.words()
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic.slicer.errors import ConfigError, Hint

CURVE_NAME = "size_curve.json"
FORMAT = "elastic-size-curve"
VERSION = 1
FINGERPRINT_FILES = ("config.json", "elastic_config.json")  # and the router file (router.file)
VERDICTS = ("trained", "between", "outside", "interpolated", "not measured")


@dataclass(frozen=True)
class CurvePoint:
    """One measured architecture."""

    sizes: tuple[str, ...]  # the budgets / sizes asked for that resolved to it ("60%", "75%")
    trained: bool  # a trained budget's own architecture
    parameters: int
    perplexity: float  # exp(nll) on the record's held-out text
    nll: float  # per predicted token (nats)
    spec: dict  # SliceSpec.to_json(parent): exactly what was measured
    resolved_by: str  # where the architecture came from ("router", "router, not trained: ...")

    @property
    def name(self) -> str:
        return self.sizes[0]

    def to_json(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "trained": self.trained, "parameters": self.parameters,
                "perplexity": self.perplexity, "nll": self.nll, "resolved_by": self.resolved_by, "spec": self.spec}


@dataclass(frozen=True)
class SizeCurve:
    """A checkpoint's measured sizes, sorted by parameters (largest first)."""

    fingerprint: dict[str, str]  # file name -> SHA-256 of the files it was measured on
    evaluation: dict[str, Any]  # how: text, seq_len, windows, tokens, precision
    points: tuple[CurvePoint, ...]
    path: Path | None = None  # where it was read from

    def to_json(self) -> dict[str, Any]:
        """The file's content (``size_curve.json``); ``outside`` is derived, written for people."""
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "evaluation": self.evaluation,
                "sizes": [p.to_json() for p in self.points],
                "outside": [{"sizes": list(p.sizes), "parameters": p.parameters, "perplexity": p.perplexity,
                             "neighbours": [_neighbour(n) for n in self.trained_neighbours(p.parameters)]}
                            for p in self.outside()]}

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> "SizeCurve":
        """Parse a record; every problem is collected before raising (ConfigError)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"not a size-curve record (format {FORMAT!r})", path=str(path) if path else None)
        problems = [] if data.get("version") == VERSION else [f"version {data.get('version')!r}; this is {VERSION}"]
        points = []
        for k, row in enumerate(data.get("sizes") or []):
            try:
                points.append(CurvePoint(tuple(row["sizes"]), bool(row["trained"]), int(row["parameters"]),
                                         float(row["perplexity"]), float(row["nll"]), dict(row["spec"]),
                                         str(row.get("resolved_by", ""))))
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"sizes[{k}]: {type(e).__name__}: {e}")
        if not isinstance(data.get("fingerprint"), dict):
            problems.append("no fingerprint (the files it was measured on)")
        if problems:
            raise ConfigError("broken size-curve record", problems=problems, path=str(path) if path else None)
        return cls(dict(data["fingerprint"]), dict(data.get("evaluation") or {}),
                   tuple(sorted(points, key=lambda p: -p.parameters)), path)

    def point(self, spec_json: dict) -> CurvePoint | None:
        """The measured point of exactly this architecture, or None."""
        key = _key(spec_json)
        return next((p for p in self.points if _key(p.spec) == key), None)

    def trained_neighbours(self, parameters: int) -> list[CurvePoint]:
        """The trained points on either side of ``parameters``: the smallest with at least as many,
        then the largest with fewer (one of them where it lies beyond the trained sizes)."""
        trained = [p for p in self.points if p.trained]
        above = [p for p in trained if p.parameters >= parameters]
        below = [p for p in trained if p.parameters < parameters]
        return above[-1:] + below[:1]

    def lies_between(self, point: CurvePoint) -> bool:
        """Whether a measured size's perplexity is no better than its larger trained neighbour's
        and no worse than its smaller one's."""
        for n in self.trained_neighbours(point.parameters):
            if n.parameters >= point.parameters and point.perplexity < n.perplexity:
                return False
            if n.parameters < point.parameters and point.perplexity > n.perplexity:
                return False
        return True

    def outside(self) -> list[CurvePoint]:
        """The in-between sizes measured outside their trained neighbours: not offered."""
        return [p for p in self.points if not p.trained and not self.lies_between(p)]

    def interpolate(self, parameters: int) -> tuple[float, CurvePoint, CurvePoint] | None:
        """Perplexity linearly interpolated (in parameters) between the measured points on either
        side, with them; None beyond the measured sizes."""
        above = [p for p in self.points if p.parameters >= parameters]
        below = [p for p in self.points if p.parameters <= parameters]
        if not above or not below:
            return None
        a, b = above[-1], below[0]
        t = 0.0 if a.parameters == b.parameters else (parameters - b.parameters) / (a.parameters - b.parameters)
        return b.perplexity + t * (a.perplexity - b.perplexity), a, b


@dataclass(frozen=True)
class Quality:
    """What the record says about one architecture (see :func:`judge`)."""

    verdict: str  # one of VERDICTS
    parameters: int  # of the architecture judged
    perplexity: float | None = None  # measured
    interpolated: float | None = None  # "interpolated": estimated between measured sizes, not measured
    measured_as: tuple[str, ...] = ()  # the sizes the record measured it as
    neighbours: tuple[CurvePoint, ...] = ()  # trained neighbours (measured)
    between: tuple[CurvePoint, ...] = ()  # "interpolated": the measured points it lies between
    record: str | None = None  # the record's path
    note: str | None = None  # why there is no usable record

    @property
    def offered(self) -> bool:
        return self.verdict != "outside"

    def to_json(self) -> dict[str, Any]:
        """The manifest's and ``plan --json``'s ``quality``: ``verdict``, ``perplexity`` (measured) or
        ``interpolated``, ``neighbours`` (the trained ones: budget, parameters, perplexity), ``record``."""
        return {"verdict": self.verdict, "parameters": self.parameters, "perplexity": self.perplexity, "interpolated": self.interpolated,
                "measured_as": list(self.measured_as), "neighbours": [_neighbour(n) for n in self.neighbours],
                "between": [_neighbour(n) for n in self.between], "record": self.record, "note": self.note,
                "words": self.words()}

    def words(self) -> str:
        """One sentence for a note or a table."""
        near = ", ".join(f"{n.name} {n.perplexity:.3f}" for n in self.neighbours)
        if self.verdict == "trained":
            return f"measured perplexity {self.perplexity:.3f}"
        if self.verdict in ("between", "outside"):
            return f"measured perplexity {self.perplexity:.3f}, {self.verdict} its trained neighbours' ({near})"
        if self.verdict == "interpolated":
            a, b = self.between
            return (f"not measured; about {self.interpolated:.3f} interpolated between the measured sizes {a.name} "
                    f"({a.perplexity:.3f}) and {b.name} ({b.perplexity:.3f})"
                    + (f"; trained neighbours {near}" if near else ""))
        return "not measured" + (f" ({self.note})" if self.note else "")


def _neighbour(p: CurvePoint) -> dict[str, Any]:
    return {"budget": p.name, "parameters": p.parameters, "perplexity": p.perplexity}


def _key(spec_json: dict) -> str:
    return json.dumps(spec_json, sort_keys=True)


def fingerprint(root: str | Path, router_file: str = "router.safetensors") -> dict[str, str]:
    """SHA-256 of the files a measurement depends on and that retraining rewrites: config.json,
    elastic_config.json and the router (when present). The weights are not hashed (gigabytes);
    a retrained checkpoint has a new router."""
    out = {}
    for name in (*FINGERPRINT_FILES, router_file):
        path = Path(root) / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def read_curve(root: str | Path, router_file: str = "router.safetensors") -> tuple[SizeCurve | None, str | None]:
    """The checkpoint's record (``ROOT/size_curve.json``) and None; or None and why there is none
    to use (absent, unreadable, of another version of the checkpoint). Never raises for the record:
    a size it cannot vouch for is "not measured"."""
    path = Path(root) / CURVE_NAME
    if not path.is_file():
        return None, f"no {CURVE_NAME} in the checkpoint; measure one with `elastic eval --curve`"
    try:
        curve = SizeCurve.from_json(json.loads(path.read_text()), path)
    except (OSError, ValueError, ConfigError) as e:
        return None, f"{CURVE_NAME} is unreadable ({getattr(e, 'message', None) or e}); measure it again"
    if curve.fingerprint != fingerprint(root, router_file):
        return None, (f"{CURVE_NAME} was measured on another version of this checkpoint (its config or router "
                      "differ); measure it again")
    return curve, None


def judge(curve: SizeCurve | None, spec_json: dict, parameters: int, note: str | None = None) -> Quality:
    """What ``curve`` says about the architecture ``spec_json`` (of ``parameters`` parameters):
    "trained" or "between" / "outside" (measured: its perplexity against its trained neighbours'),
    "interpolated" (not measured, but between measured sizes), or "not measured" (``note``: why)."""
    if curve is None:
        return Quality("not measured", parameters, note=note)
    record = str(curve.path) if curve.path else None
    neighbours = tuple(curve.trained_neighbours(parameters))
    p = curve.point(spec_json)
    if p is not None:
        verdict = "trained" if p.trained else ("between" if curve.lies_between(p) else "outside")
        return Quality(verdict, parameters, p.perplexity, measured_as=p.sizes, record=record,
                       neighbours=() if p.trained else neighbours)
    near = curve.interpolate(parameters)
    if near is None:
        return Quality("not measured", parameters, neighbours=neighbours, record=record,
                       note=f"beyond the sizes {CURVE_NAME} measured; measure it with `elastic eval`")
    return Quality("interpolated", parameters, interpolated=near[0], neighbours=neighbours, between=near[1:],
                   record=record)


def spec_quality(root: str | Path, router_file: str, spec_json: dict, parameters: int) -> Quality:
    """:func:`judge` with the record of the checkpoint at ``root`` (:func:`read_curve`)."""
    curve, note = read_curve(root, router_file)
    return judge(curve, spec_json, parameters, note)


class OffCurveSize(ConfigError):
    """An in-between size whose measured perplexity lies outside its trained neighbours'."""


def refuse_off_curve(size: str, quality: Quality) -> None:
    """Raise :class:`OffCurveSize` for a size measured outside its trained neighbours (a no-op
    for any other verdict)."""
    if quality.offered:
        return
    ppl = quality.perplexity
    why = []
    for n in quality.neighbours:
        if n.parameters >= quality.parameters and ppl < n.perplexity:
            why.append(f"better than the larger trained budget {n.name}'s {n.perplexity:.4f}: the curve is not "
                       "monotone here, so the measurement does not vouch for it")
        elif n.parameters < quality.parameters and ppl > n.perplexity:
            why.append(f"worse than the smaller trained budget {n.name}'s {n.perplexity:.4f}: that budget serves better")
    problems = [f"{size} as resolved: {quality.parameters:,} parameters, perplexity {ppl:.4f}"]
    problems += [f"trained budget {n.name}: {n.parameters:,} parameters, perplexity {n.perplexity:.4f}"
                 for n in quality.neighbours]
    raise OffCurveSize(
        f"size {size!r} is not offered: its measured perplexity {ppl:.4f} lies outside its trained neighbours' "
        f"({'; '.join(why)}); choose a trained budget or another size", problems=problems, path=quality.record,
        hint=Hint("off_curve", "or use it anyway"))


def curve_target(out: str | Path, force: bool = False) -> Path:
    """The file a record will be written to: ``out``, or ``out/size_curve.json`` for a directory.
    Checked before anything is measured.

    Raises:
        ConfigError: it exists (without ``force``), its directory is missing, or cannot be written
            (a read-only checkpoint, e.g. a Hugging Face cache: write it elsewhere).
    """
    path = Path(out)
    path = path / CURVE_NAME if path.is_dir() else path
    if path.exists() and not force:
        raise ConfigError("a file is already there; the size-curve record replaces it only when asked",
                          path=str(path), hint=Hint("replace", "replace it"))
    if not path.parent.is_dir():
        raise ConfigError("no such directory to write the size-curve record in", path=str(path.parent))
    try:  # the one reliable test of a read-only directory (permissions, a read-only mount, a cache)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write here ({e.strerror or e}): the directory is read-only; the record is never "
                          "written anywhere else by itself: name a writable --out", path=str(path.parent)) from None
    return path


def write_curve(curve: SizeCurve, out: str | Path, force: bool = False) -> Path:
    """Write ``curve`` to ``out`` (:func:`curve_target`), atomically (a temporary file renamed):
    a failure leaves what was there. Returns the path written."""
    path = curve_target(out, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as any file written here (mkstemp's are private)
        with os.fdopen(fd, "w") as f:
            json.dump(curve.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
