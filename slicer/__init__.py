"""The core of elastic: architecture, checkpoint I/O, the reference model, slicing.

Importing ``elastic.slicer`` (or ``elastic.slicer.arch``, ``elastic.slicer.checkpoint``, ``elastic.slicer.describe``) does not import
torch; ``elastic.slicer.model`` and ``elastic.slicer.ssd`` do.
"""
