"""Making a dense Nemotron-H parent elastic (DESIGN.md section 6): training settings (``config``),
token shards (``data``), a tokenizer trained on local text (``tokenizer``), importance and
permutation (``importance``, ``permute``), the router and the elastic forward (``elastic``), the
training loop and the elastic checkpoint it writes (``train``), the dry run's memory plan
(``memory``), and plain training of one fixed model (``pretrain``). Depends on ``elastic.slicer``;
nothing is re-exported here."""
