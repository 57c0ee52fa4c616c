"""``maskrcnn-serve``: run the service on an engine artifact.

Every setting is a flag (``--max-batch-size 4``) and an environment variable
(``MASKRCNN_MAX_BATCH_SIZE=4``); flags win. The API key is read from ``MASKRCNN_API_KEY`` only,
so it never shows in the process list.

On SIGTERM (or SIGINT) the server stops accepting connections, finishes in-flight and queued
requests within ``--grace-period-s``, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.exceptions import describe_validation_errors
from service.settings import Settings

ENV_ONLY = ("api_key",)
STARTUP_FAILURE = 3  # uvicorn's exit code when the app fails to start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flags = ["--" + name.replace("_", "-")]
        if name == "engine_dir":
            flags.insert(0, "--engine")
        # Values stay strings here; Settings validates and converts them with the env values.
        parser.add_argument(
            *flags, dest=name, metavar=name.upper(),
            help=f"{field.description or ''} [env MASKRCNN_{name.upper()}, default {field.default}]",
        )
    return parser


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        parser.error(describe_validation_errors(exc.errors()))
    if settings.engine_dir is None:
        parser.error("--engine DIR (or MASKRCNN_ENGINE_DIR) is required")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.grace_period_s,
        )
    )
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it; these make a drained server exit 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
