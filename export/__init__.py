"""ONNX graphs with recurrent state, parity checks, TensorRT engines. Depends on ``slicer``;
nothing here yet."""
