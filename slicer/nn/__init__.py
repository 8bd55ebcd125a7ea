"""The reference PyTorch model: the dense Nemotron-H (``model``), the chunked SSD scan and its
one-step recurrence (``ssd``), the masked forward of a nested model inside its parent
(``masked``), the optional CUDA kernels (``kernels``), the one greedy generation loop behind
a torch or ONNX Runtime backend (``generate``, no torch at import) and the smoke test (``smoke``)."""
