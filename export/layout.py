"""File and tensor names of an export directory (no torch import: runtimes read these too)."""

from pathlib import Path

PREFILL, DECODE = "prefill.onnx", "decode.onnx"
EXTEND = "extend.onnx"  # a chunk of a prompt after a state (ONNX Runtime's chunked prefill)
WEIGHTS = "weights.bin"  # external data shared by the graphs
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks a copied bundle
README, MANIFEST = "README.md", "export_manifest.json"
ENGINE_META, SCRIPT = "engine_meta.json", "build_engines.sh"
ENGINES = {PREFILL: "prefill.engine", DECODE: "decode.engine"}
PAST, PRESENT = "past_", "present_"  # graph input / output prefixes of the state tensors
DYNAMIC_DIMS = ("batch", "seq", "past")  # names of the dynamic axes in the graphs

# graph initializer names: the graph wrappers hold the reference model as ``.model``; a Linear weight
# stored transposed (as the graphs' MatMuls read it) carries a suffix
PARAM_PREFIX = "model."
TRANSPOSED = ".T"


def param_of(name: str) -> tuple[str, bool]:
    """The reference model's parameter a graph initializer holds, and whether it holds it transposed."""
    return name.removeprefix(PARAM_PREFIX).removesuffix(TRANSPOSED), name.endswith(TRANSPOSED)


def checksums(root: Path) -> str:
    """``sha256sum`` lines for every file under ``root`` but ``SHA256SUMS`` itself, paths relative to
    it (nested ones included, e.g. an Edge-LLM bundle's ``llm/``), read in blocks: ``sha256sum -c
    SHA256SUMS`` checks a bundle copied to the device."""
    import hashlib

    lines = []
    for f in sorted(q for q in Path(root).rglob("*") if q.is_file() and q.name != CHECKSUMS):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        lines.append(f"{h.hexdigest()}  {f.relative_to(root)}\n")
    return "".join(lines)
