"""Checkpoints on disk: reading one (``reader``), writing one atomically (``writer``), and the
rules every output directory obeys (``outputs``)."""
