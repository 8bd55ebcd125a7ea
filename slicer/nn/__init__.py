"""The reference PyTorch model: the dense Nemotron-H (``model``), the chunked SSD scan and its
one-step recurrence (``ssd``), the masked forward of a nested model inside its parent
(``masked``), the optional CUDA kernels (``kernels``) and greedy generation (``smoke``)."""
