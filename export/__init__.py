"""ONNX graphs with recurrent state, parity checks, TensorRT engines. Depends on ``elastic.slicer`` (and
``elastic.profiles`` for engine settings); imports nothing heavy at import time.

- ``elastic.export.pipeline.export_model(model_dir, out, format=..., target=...)``: ``elastic export`` as
  one call (``export_onnx`` for the graphs alone, ``check_only`` for the operator check alone);
- ``elastic.export.graphs``: ``PrefillGraph`` / ``DecodeGraph`` wrappers and the state tensor names;
- ``elastic.export.onnx_export.write_graphs``: the two ONNX graphs (opset 18, shared external data);
- ``elastic.export.parity.check_parity``: ONNX Runtime against the PyTorch reference;
- ``elastic.export.runtime``: ``OnnxGenerator`` (greedy decoding with ONNX Runtime), ``generate_text``;
- ``elastic.export.trt``: ``check_graph`` / ``check_export`` (TensorRT's operator matrix, no TensorRT
  needed), ``engine_settings``, ``build_or_script`` (engines, or ``build_engines.sh``).
"""
