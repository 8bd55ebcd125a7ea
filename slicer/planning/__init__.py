"""Planning, no torch: the memory a nested model needs (``memory``), the fit decision and its
target (``fit``), and what a checkpoint holds (``describe``)."""
