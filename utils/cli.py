"""How every command-line entry point ends on a user's mistake: one `error:` line, status 2.

A bad flag value, a combination that cannot work, a file that does not fit or a count of zero is
the user's to fix, not a bug: the entry point prints `<prog>: error: <what and how to fix it>` on
stderr and exits with status 2 (argparse's convention), without a traceback. Real internal
errors keep theirs. `AR_DEBUG=1` shows the traceback of a user error too.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Mixed into the project's error classes that always mean bad input (a checkpoint that does
    not fit, a sample folder of other settings, a failed download, missing weights)."""


#: what counts as the user's mistake: our error classes, bad values, files that are not there.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError)


def error_line(prog: str, error: BaseException) -> str:
    """`<prog>: error: <message>` on one line (a multi-line message is joined with '; ')."""
    text = " ".join(str(error).split("\n")).strip() or type(error).__name__
    return f"{prog}: error: {text}"


def run_cli(main: Callable[..., Any], *args: Any, prog: str | None = None) -> Any:
    """Call an entry point's `main(*args)`; a user error exits 2 with one `error:` line."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(*args)
    except USER_ERRORS as e:
        if os.environ.get("AR_DEBUG"):
            raise
        print(error_line(prog, e), file=sys.stderr)
        sys.exit(2)
