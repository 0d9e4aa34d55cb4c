"""The `promethean` command. Each verb is a thin call into the modules that own the logic.

Bad input raises PrometheanError somewhere below; `main()` prints its sentence and exits 1, so
no user ever sees a traceback for a mistake of theirs.

The commands live one group per module (models, convert, data, training, continual, memory,
serve), each a thin call; importing this package registers them all on `app` (`common` holds
the apps, consoles, shared options and model loading).
"""

from __future__ import annotations

import sys

import typer

# Importing the command modules registers their commands on the apps, in this order in --help.
from promethean.cli import models  # noqa: F401, I001
from promethean.cli import convert  # noqa: F401
from promethean.cli import data  # noqa: F401
from promethean.cli import training  # noqa: F401
from promethean.cli import continual  # noqa: F401
from promethean.cli import memory  # noqa: F401
from promethean.cli import serve  # noqa: F401
from promethean.cli.common import (  # noqa: F401 (tests and scripts import these from here)
    _load_model,
    _one_line,
    _os_error_sentence,
    _show_warning,
    app,
    err_console,
)
from promethean.errors import PrometheanError, TrainingInterrupted


def main() -> None:
    import warnings

    # Typer raises click's exceptions (vendored in newer Typer): found through BadParameter's
    # bases so that this works with either.
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    warnings.showwarning = _show_warning
    try:
        # standalone_mode=False: click hands usage errors to us instead of printing its boxed
        # message and exiting 2, so they become one `error:` line and exit 1 like the rest.
        status = app(standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except click_exception as error:
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError":  # `promethean model`: its help
            sys.stdout.write(error.format_message() + "\n")
            sys.exit(0)
        command = context.command_path if context is not None else "promethean"
        message = _one_line(" ".join(error.format_message().split()).rstrip("."))
        sys.stderr.write(f"error: {message} ({_one_line(command)} --help lists the arguments "
                         "and options).\n")
        sys.exit(1)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        err_console.print("interrupted")
        sys.exit(130)
    except TrainingInterrupted as stopped:  # saved: the same command continues it
        sys.stderr.write(f"{_one_line(str(stopped))}\n")
        sys.exit(130 if stopped.signal_name == "SIGINT" else 143)
    except PrometheanError as error:
        # Plain write: one unwrapped line that scripts can match whatever the terminal width.
        sys.stderr.write(f"error: {_one_line(str(error))}\n")
        sys.exit(1)
    except OSError as error:  # a path the OS refuses (unwritable, not a directory, in use, ...)
        sys.stderr.write(_one_line(f"error: {_os_error_sentence(error)}") + "\n")
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
