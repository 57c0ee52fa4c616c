"""Wait until a service answers ``GET /readyz`` with 200 (engine loaded and warmed up), or check it once.

    python -m scripts.tools.wait_ready http://127.0.0.1:8000 --pid "$server_pid" --timeout 600

Exits 0 once ready; 1 with a message when the process ``--pid`` exits first or ``--timeout``
seconds pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import httpx


class NotReady(RuntimeError):
    """The service did not become ready: its process exited, or the timeout passed."""


def wait_ready(url: str, *, alive: Callable[[], bool] | None = None, timeout_s: float = 600.0,
               interval_s: float = 0.5) -> None:
    """Poll ``url/readyz`` every ``interval_s`` seconds until it answers 200.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        alive: says whether the server process still runs; polling stops when it returns False.
        timeout_s: give up after this many seconds.

    Raises:
        NotReady: ``alive`` returned False, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url.rstrip("/") + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if alive is not None and not alive():
            raise NotReady(f"the server exited before {url} was ready")
        if time.monotonic() > deadline:
            raise NotReady(f"{url} was not ready after {timeout_s:g} s")
        time.sleep(interval_s)


def require_ready(url: str, timeout_s: float = 10.0) -> None:
    """Ask ``url/readyz`` once; return if it answers 200. What a client runs before sending work,
    so that a wrong URL or a server still warming up fails at once instead of after every retry.

    Raises:
        NotReady: nothing answers at ``url``, or it answers not ready (with the service's reason).
    """
    try:
        ready = httpx.get(url.rstrip("/") + "/readyz", timeout=timeout_s)
    except httpx.TransportError as error:
        raise NotReady(f"no service answers at {url} ({type(error).__name__}: {error}): start it "
                       "(maskrcnn-serve --engine DIR) or correct the URL") from None
    if ready.status_code != 200:
        try:
            reason = ready.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = ready.text[:200]
        raise NotReady(f"{url} is not ready (/readyz answered {ready.status_code}: {reason}); wait for it with "
                       f"`python -m scripts.tools.wait_ready {url}`")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (``kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.wait_ready", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="service base URL")
    parser.add_argument("--pid", type=int, default=None, help="stop waiting when this process (the server) exits")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait at most (default 600)")
    args = parser.parse_args(argv)
    alive = (lambda: process_alive(args.pid)) if args.pid is not None else None
    try:
        wait_ready(args.url, alive=alive, timeout_s=args.timeout)
    except NotReady as error:
        print(f"wait_ready: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
