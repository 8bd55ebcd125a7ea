"""Typed errors: the one tree lives in ``elastic.profiles.errors`` (the bottom layer); this module
gives it the names the slicer, trainer and export import.

The CLI maps any ElasticError to one line on stderr and exit code 2; other exceptions are bugs.
"""

from __future__ import annotations

from elastic.profiles.errors import (CheckpointError, ConfigError, ElasticError, Hint,
                                     MissingDependencyError)

__all__ = ["CheckpointError", "ConfigError", "ElasticError", "Hint", "MissingDependencyError"]
