"""The core of elastic.

- ``formats``: config.json, safetensors headers, the elastic format, slice specs, slicing rules (no torch);
- ``storage``: the checkpoint reader, the atomic writer, the output rules;
- ``slice``: the streaming slice built on both;
- ``nn``: the reference PyTorch model and generation;
- ``planning``: memory, the fit decision, what a checkpoint holds (no torch);
- ``errors``: the error tree every layer raises.

Importing ``formats``, ``storage.reader``, ``planning`` or ``slice`` does not import torch;
``nn`` does.
"""
