"""``accelerate launch`` for several processes, ending the way every other entry point ends (src/common/cli.py).

    python -m src.train.launch --config_file src/train/configs/single_node.yaml --num_processes 2 \\
        -m src.train.train --model M --train DIR --out CKPTDIR

The flags are accelerate's own (``accelerate launch --help``); this only changes how a failed run is reported.
Plain ``accelerate launch`` prints each rank's error line and then torch's launcher adds a traceback of its own and
a report of every failed process, exiting 1 whatever the ranks' exit codes were. Here each rank hands its one-line
message to the launcher through torch elastic's error file (``TORCHELASTIC_ERROR_FILE``, see ``cli.report``) instead
of printing it, and the launcher prints each distinct message once and exits with the first failed rank's code: 2 for
a user mistake, 1 for a bug, 130 for Ctrl-C. Ranks stopped by the launcher because another failed are not reported.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from src.common import cli


def build_parser():
    """accelerate's own ``accelerate launch`` parser (its flags, then the script and the script's arguments)."""
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def main(argv: list[str] | None = None) -> int:
    # accelerate and torch elastic are imported here: `--help` of the other steps must not pay for them.
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = build_parser().parse_args(argv)
    if not cli.debug_enabled():  # its "failed (exitcode: 2) local_rank: 1 ..." line: the report below says it better
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # "Received 2 death signal, ..."
    os.environ[cli.REPORTED_BY_LAUNCHER] = "1"
    try:
        launch_command(args)
    except ChildFailedError as e:
        return report_failures(e.failures)
    except SignalException as e:  # Ctrl-C or a kill reached the launcher; it has stopped the ranks
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        print(f"error: stopped by signal {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def report_failures(failures: dict) -> int:
    """Print each distinct failure message once (the ranks' own ``error:`` lines, or what the launcher knows of a
    rank that wrote none) and return the exit code of the first rank that failed on its own."""
    own = {rank: f for rank, f in failures.items() if not _stopped_by_launcher(f)} or failures
    # the ranks that exited on their own come first: the others may have been stopped while failing the same way
    first = min(own.values(), key=lambda f: (f.exitcode <= 0, f.timestamp, f.local_rank))
    printed = set()
    for rank in sorted(own):
        line = _message(rank, own[rank])
        if line not in printed:
            printed.add(line)
            print(line, file=sys.stderr, flush=True)
    if first.exitcode == cli.EXIT_INTERRUPTED or first.exitcode == -signal.SIGINT:
        return cli.EXIT_INTERRUPTED
    if first.exitcode == cli.EXIT_BUG and not cli.debug_enabled():
        print(cli.DEBUG_HINT, file=sys.stderr, flush=True)
    return first.exitcode if first.exitcode > 0 else 128 - first.exitcode


def _stopped_by_launcher(failure) -> bool:
    """A rank the launcher terminated (SIGTERM) after another one failed: it wrote no message of its own."""
    return failure.exitcode == -signal.SIGTERM and not _own_message(failure)


def _own_message(failure) -> str:
    message = failure.message if isinstance(failure.message, str) else ""
    return message if message.startswith(("error: ", "interrupted")) else ""


def _message(rank: int, failure) -> str:
    if _own_message(failure):
        return failure.message
    if failure.exitcode < 0:
        name = failure.signal_name()
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"error: process {rank} was killed by {name}{hint}"
    return f"error: process {rank} exited with code {failure.exitcode} (its output is above)"


if __name__ == "__main__":
    sys.exit(cli.run(main))
