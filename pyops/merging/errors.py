"""The errors of `pyops merge`: each names what is wrong and where (key and line, tensor and model)."""
from __future__ import annotations


class MergeError(ValueError):
    """A merge that cannot run as asked. Nothing has been written when it is raised."""


class ConfigError(MergeError):
    """A merge configuration that cannot be run; the message names the key (and its line)."""


class CheckpointError(MergeError):
    """A checkpoint that cannot be read or does not match the others (names, shapes, files)."""
