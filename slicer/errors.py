"""Typed errors: the one tree lives in ``elastic.profiles.errors`` (the bottom layer); this module
gives it, and the one reading of ELASTIC_DEBUG (:func:`debug_enabled`), the names the slicer,
trainer and export import.

The CLI maps any ElasticError to one line on stderr and exit code 2; other exceptions are bugs.
"""

from __future__ import annotations

from elastic.profiles.errors import (CheckpointError, ConfigError, ElasticError, Hint,
                                     MissingDependencyError, debug_enabled)

__all__ = ["CheckpointError", "ConfigError", "ElasticError", "Hint", "MissingDependencyError", "debug_enabled"]
