"""ONNX graphs with recurrent state, parity checks, TensorRT engines. Depends on ``slicer`` (and
``profiles`` for engine settings); imports nothing heavy at import time.

- ``export.pipeline.export_model(model_dir, out, format=..., target=...)``: ``elastic export`` as
  one call (``export_onnx`` for the graphs alone, ``check_only`` for the operator check alone);
- ``export.graphs``: ``PrefillGraph`` / ``DecodeGraph`` wrappers and the state tensor names;
- ``export.onnx_export.write_graphs``: the two ONNX graphs (opset 18, shared external data);
- ``export.parity.check_parity``: ONNX Runtime against the PyTorch reference;
- ``export.runtime``: ``OnnxGenerator`` (greedy decoding with ONNX Runtime), ``generate_text``;
- ``export.trt``: ``check_graph`` / ``check_export`` (TensorRT's operator matrix, no TensorRT
  needed), ``engine_settings``, ``build_or_script`` (engines, or ``build_engines.sh``).
"""
