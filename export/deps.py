"""Optional packages of the export, detected where used; their absence is a fix-it message."""

from __future__ import annotations

import importlib.util

from elastic.slicer.errors import MissingDependencyError

EXPORTER = ("onnx", "onnxscript", "onnx_ir", "onnxruntime")  # torch.onnx.export(dynamo=True) + parity


def require(*modules: str) -> None:
    """Raise MissingDependencyError naming every module of ``modules`` that is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed here but "
                                     "not installed; pip install 'elastic[onnx]'")
