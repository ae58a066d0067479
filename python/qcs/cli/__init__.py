"""The ``qcs`` command line, on top of the library (no library module imports it).

``qcs train`` with no arguments generates the built-in data (once, cached) and trains the
``tiny`` QCS preset on it, printing the test accuracy. Every error the package raises on
purpose (:class:`qcs.errors.QCSError`) is printed as one line ``qcs COMMAND: error: MESSAGE``
with exit status 2 (1 for a run that started and failed, :class:`qcs.errors.RunFailed`).
Messages go to stderr through the ``qcs`` logger (``-q`` / ``-v``); stdout carries only a
command's result.
"""

from __future__ import annotations

import sys

from .parser import build_parser

__all__ = ["apply_args", "build_parser", "main"]


def apply_args(cfg, args) -> None:
    """Copy the explicit options of ``args`` into ``cfg`` (see
    :func:`qcs.cli.commands.apply_args`)."""
    from .commands import apply_args as apply
    apply(cfg, args)


def _command(name: str):
    from . import commands, use
    return {"train": commands.cmd_train, "eval": commands.cmd_eval, "data": commands.cmd_data,
            "convert": commands.cmd_convert, "config": commands.cmd_config,
            "predict": use.cmd_predict, "visualize": use.cmd_visualize,
            "export": use.cmd_export}[name]


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a list of bad files stays readable: joined)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcs`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..errors import QCSError
    from ..logs import console
    verbosity = -1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0)
    try:
        with console(verbosity):
            return _command(args.command)(args)
    except (QCSError, FileNotFoundError, FileExistsError) as exc:
        print(f"qcs {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt as exc:  # train: SIGINT / SIGTERM after saving (exit_code)
        print(f"qcs {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
