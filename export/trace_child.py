"""The child process that traces one ONNX graph (``export.onnx_export`` starts one per graph, so
the prefill and decode graphs trace side by side on two cores):

    python -m elastic.export.trace_child '{"config": {...}, "dtype": "float32", "opset": 18,
                                            "which": "prefill", "path": "OUT/.prefill.traced"}'

It writes the graph without weights (``onnx_export.save_traced``); the parent loads it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argument: str) -> None:
    """Trace the graph ``argument`` (a JSON object: config, dtype, opset, which, path) names."""
    import torch

    from elastic.export.onnx_export import save_traced, trace
    from elastic.slicer.formats.arch import Arch

    args = json.loads(argument)
    graph = trace(Arch.from_config(args["config"]), getattr(torch, args["dtype"]), args["opset"], args["which"])
    save_traced(graph, Path(args["path"]))


if __name__ == "__main__":
    main(sys.argv[1])
