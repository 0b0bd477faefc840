"""The one error type of data preparation, and how command-line entry points report it.

Bad input must cost the user one readable line and a non-zero exit, never a traceback or a
half-written output: library code raises `DataError` with a message naming the bad value and
what is allowed, and every `python -m data_prep.*` command runs through `run_command`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

# Exit status for bad input, the same as argparse uses for a bad command line.
EXIT_BAD_INPUT = 2


class DataError(ValueError):
    """Input data or an output path is not usable. The message is one line."""


def run_command(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's `main(argv)`; a DataError becomes `error: <message>` on stderr and exit 2."""
    try:
        main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line ending like any other bad input: the usage, then one
    last line `error: <prog>: <message>` (argparse's own ends `<prog>: error: ...`), exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
