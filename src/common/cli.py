"""How every entry point ends: a user mistake is one line on stderr and exit code 2, never a traceback.

    error: FILE: record N, field 'F': what is wrong        (DataError)
    error: --flag: what is wrong                           (UsageError)
    error: no space left on device: PATH                   (a full disk)
    interrupted                                            (Ctrl-C, exit 130; outputs stay resumable)

``--debug`` anywhere on the command line (it is removed before the step parses its flags) or ``APOLLO_DEBUG=1`` in
the environment prints the traceback as well. An unexpected exception (a bug, not a user mistake) is also one line,
with exit code 1, naming its type.

Use: ``if __name__ == "__main__": sys.exit(cli.run(main))``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager

from src.common.errors import DataError, UsageError

DEBUG_ENV = "APOLLO_DEBUG"
EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
# Exceptions that mean "the input or the request is wrong": shown as their message alone.
USER_ERRORS = (DataError, UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError, UnicodeDecodeError)


# Set by src/train/launch.py for the ranks it starts: it prints their error lines itself, once each.
REPORTED_BY_LAUNCHER = "APOLLO_LAUNCHER_REPORTS"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def run(main, argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn what it raises into the one-line messages above and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # child processes (accelerate launch) see it too
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _flag_error  # documented as overridable; restored below
    try:
        code = main(argv)
    except KeyboardInterrupt:
        _traceback_if_debug()
        emit("interrupted (Ctrl-C): what was written so far is kept; rerun the same command to resume")
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a refused request
            _traceback_if_debug()
            emit(f"error: {_one_line(_strip_tag(e.code))}")
            return EXIT_USAGE
        raise
    except BaseException as e:  # noqa: BLE001 - every other exception becomes one line
        return report(e)
    finally:
        argparse.ArgumentParser.error = original_error
    return int(code or 0)


@contextmanager
def ctrl_c_deferred():
    """Ctrl-C waits until the block is done, then takes effect: for a few renames that must happen together (step
    2 swapping its outputs). Where Python does not turn Ctrl-C into KeyboardInterrupt (ignored, another handler, not
    the main thread), nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _flag_error(parser, message: str):
    """argparse's errors ("usage: ..." and "PROG: error: argument --shots: invalid int value") as one UsageError
    line: ``error: --shots: invalid int value: 'x'`` (``--help`` still shows the usage)."""
    flag, _, rest = message.partition(": ")
    if flag.startswith("argument "):
        raise UsageError(flag[len("argument "):].split("/")[0], rest)
    raise UsageError("", message)


def report(e: BaseException) -> int:
    """Print ``e`` as one ``error:`` line (plus the traceback when debugging) and return the exit code."""
    _traceback_if_debug()
    message, code = describe(e)
    if not emit(f"error: {message}"):
        return code
    if code == EXIT_BUG and not debug_enabled():
        print(DEBUG_HINT, file=sys.stderr, flush=True)
    return code


DEBUG_HINT = f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"


def emit(line: str) -> bool:
    """Print ``line`` on stderr; return False when it went to the launcher instead.

    In a process started by torch's elastic launcher (``accelerate launch``), the line is also written to the error
    file the launcher reads back (``TORCHELASTIC_ERROR_FILE``, torch's documented channel), so its failure report
    shows our message instead of "To enable traceback see ...". Under src/train/launch.py, which prints each distinct
    line once for all ranks, it is not printed here."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            path = None
    if path and os.environ.get(REPORTED_BY_LAUNCHER):
        return False
    print(line, file=sys.stderr, flush=True)
    return True


def describe(e: BaseException) -> tuple[str, int]:
    space = no_space_path(e)
    if space is not None:
        return f"no space left on device: {space}", EXIT_USAGE
    if isinstance(e, OSError) and e.filename and isinstance(e, (FileNotFoundError, PermissionError,
                                                                NotADirectoryError, IsADirectoryError)):
        text = str(e)
        if text.startswith("[Errno"):  # the bare OS message: say it as "PATH: reason"
            return f"{e.filename}: {(e.strerror or text).lower()}", EXIT_USAGE
    if isinstance(e, USER_ERRORS):
        return _one_line(_strip_tag(str(e))) or type(e).__name__, EXIT_USAGE
    return f"internal error: {type(e).__name__}: {_one_line(str(e))}", EXIT_BUG


def no_space_path(e: BaseException) -> str | None:
    """The path of a write that failed on a full disk ("?" when nothing named it), or None when ``e`` (or its causes)
    is no such failure. ``io.writing`` names the file for writers whose errors carry no file name."""
    failure = space_failure(e)
    if failure is None:
        return None
    return str(getattr(failure, "filename", None) or getattr(failure, "apollo_path", "") or "?")


def space_failure(e: BaseException) -> BaseException | None:
    """The exception in ``e``'s chain that reports a full disk. torch and DeepSpeed report it as a RuntimeError from
    their C++ writers, pyarrow as an OSError without a file name, hence the message check."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _traceback_if_debug() -> None:
    if debug_enabled():
        traceback.print_exc()


def _strip_tag(text: str) -> str:
    """Messages written for logs start with ``[step 4] ``; the error line does not need it."""
    text = text.strip()
    if text.startswith("[") and "] " in text[:20]:
        text = text.split("] ", 1)[1]
    return text


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
