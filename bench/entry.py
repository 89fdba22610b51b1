"""How a benchmark script ends, the way ``engram`` does: Ctrl-C with one line and status 130,
bad input (an :class:`~engramlab.errors.EngramError`, a missing file) with one line and status
2, no traceback for either. What a bench saved before the interruption stays (results are
moved into place whole), and the resumable benches go on from it when run again.

    if __name__ == "__main__":
        entry.run(main)
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from engramlab.errors import EngramError


def run(main: Callable[[], int | None]) -> NoReturn:
    """Call a bench's ``main`` and exit with its status."""
    name = Path(sys.argv[0]).name
    try:
        status = main()
    except (EngramError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted (what was saved stays; run the command again to go on)",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def quiet_worker() -> None:
    """A worker process's initializer: Ctrl-C reaches the parent, which ends the workers, so
    the workers themselves ignore it instead of each printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
