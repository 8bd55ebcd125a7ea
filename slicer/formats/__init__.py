"""File formats and slicing rules, no torch: config.json (``arch``), safetensors headers
(``safetensors``), the elastic checkpoint and its router (``elastic_format``), slice specs
(``spec``), and which indices of which tensor a spec keeps (``rules``)."""
