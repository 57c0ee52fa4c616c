"""Host work (decode, preprocess, postprocess) runs niced, so it yields the cores to the engine."""

from __future__ import annotations

import asyncio
import os
import threading

from service.pipeline import on_host


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_host_stages_run_at_the_configured_niceness_and_the_event_loop_does_not():
    async def main():
        return await on_host(7, thread_nice), thread_nice()

    process_nice = thread_nice()
    host, loop = asyncio.run(main())
    assert host == max(process_nice, 7)
    assert loop == process_nice  # only the worker thread was niced
