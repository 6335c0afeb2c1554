"""The errors of `pyops merge`: each names what is wrong and where (key and line, tensor and model,
output path). `python -m pyops merge` prints one as one line and exits 2."""
from __future__ import annotations


class MergeError(ValueError):
    """A merge that cannot run as asked. Nothing is left at the output when it is raised."""


class ConfigError(MergeError):
    """A merge configuration that cannot be run; the message names the key (and its line)."""


class CheckpointError(MergeError):
    """A checkpoint that cannot be read or does not match the others (names, shapes, files)."""


class OutputError(MergeError):
    """The output cannot be written: a read-only file system, no permission, a full disk. What the
    merge had written is removed before it is raised."""


# What str.splitlines() breaks a line at.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(message: str) -> str:
    """`message` on one line: a line break that a path or a name carries is written as its escape
    (\\n, \\x85, ...), so that an error is always exactly one line, for people and for scripts."""
    if not any(c in message for c in _LINE_BREAKS):
        return message
    return "".join(c.encode("unicode_escape").decode("ascii") if c in _LINE_BREAKS else c for c in message)
