"""Where a role's output goes: by default every actor and task writes its stdout/stderr (its own
lines and the libraries' warnings: vLLM, DeepSpeed, transformers, C++ runtimes) to a file under
`<run>/logs/`, and the driver's terminal shows only our progress; `--verbose` (`logging.verbose`)
leaves them on the terminal. On a multi-node cluster without a shared file system each node keeps
its actors' files under the same path."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def send_output_to(path: str | None) -> None:
    """This process's stdout and stderr (file descriptors 1 and 2, so C libraries too) go to `path`
    (appended) from now on; None leaves them alone."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def output_to(path: str | None):
    """`send_output_to` for the duration of a task (a reused worker gets its own output back)."""
    if not path:
        yield
        return
    saved = os.dup(1), os.dup(2)
    try:
        send_output_to(path)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
