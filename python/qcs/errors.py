"""The errors of the ``qcs`` package: one base class, :class:`QCSError`, that the command
line catches and reports as ``qcs COMMAND: error: MESSAGE`` (exit status 2).

Each subclass also derives from the built-in type it refines, so ``except ValueError`` or
``except ImportError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvertError",
    "DataError",
    "DeviceError",
    "ExportError",
    "MissingDependency",
    "QCSError",
    "RunFailed",
    "UsageError",
    "WeightsError",
]


class QCSError(Exception):
    """Base of every error the package raises on purpose (bad input, missing files)."""


class ConfigError(QCSError, ValueError):
    """A configuration value is missing, unknown, misplaced or of the wrong type."""


class CheckpointError(QCSError, RuntimeError):
    """A checkpoint or weights file is missing, foreign or inconsistent (the message names
    it)."""


class WeightsError(CheckpointError, ValueError):
    """A pretrained weights file does not fit the network (no tensor matches)."""


class DataError(QCSError, RuntimeError):
    """A dataset file is missing, malformed or unreadable (the message names it)."""


class ConvertError(QCSError, RuntimeError):
    """An official checkpoint cannot be imported (the message names it and says why)."""


class UsageError(QCSError, ValueError):
    """A command-line argument is invalid (the message names it)."""


class MissingDependency(QCSError, ImportError):
    """An optional package is not installed (the message says which extra provides it)."""


class ExportError(QCSError, RuntimeError):
    """The exporter could not convert the network (the message says what failed)."""


class DeviceError(QCSError, RuntimeError):
    """A ``--device`` names no device of this machine (the message says which exist)."""


class RunFailed(QCSError, RuntimeError):
    """A run started but cannot go on (e.g. its loss stopped being finite); the message
    says where and what to try. The command line exits with :attr:`exit_code` 1."""

    exit_code = 1
