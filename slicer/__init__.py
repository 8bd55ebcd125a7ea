"""The core of elastic: architecture, checkpoint I/O, the reference model, slicing.

Importing ``slicer`` (or ``slicer.arch``, ``slicer.checkpoint``, ``slicer.describe``) does not import
torch; ``slicer.model`` and ``slicer.ssd`` do.
"""
