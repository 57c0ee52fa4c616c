"""`maskrcnn-demo`: the demo data and model tools, one subcommand each.

Each subcommand is a module function `main(argv) -> int` that parses its own options, so
`maskrcnn-demo data --help` shows that subcommand's options. Adding a subcommand is one entry
in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from scripts.demo import data as demo_data, eval as demo_eval, train as demo_train

# name -> (entry point taking the arguments after the name, one-line help)
SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "data": (demo_data.main, "write a synthetic COCO-layout instance-segmentation dataset"),
    "train": (demo_train.main, "train the demo Mask R-CNN from scratch and write an mmdet checkpoint"),
    "eval": (demo_eval.main, "COCO AP and reference results of a checkpoint on a dataset split"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `maskrcnn-demo COMMAND [options]`; returns the subcommand's exit status."""
    parser = argparse.ArgumentParser(
        prog="maskrcnn-demo",
        description="Synthetic data and a demo model for measuring maskrcnn-serve offline.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        # The subcommand's own parser handles its options, --help included.
        subcommands.add_parser(name, help=help_text, add_help=False)
    args, subcommand_argv = parser.parse_known_args(argv)
    run, _ = SUBCOMMANDS[args.command]
    return run(subcommand_argv)


if __name__ == "__main__":
    raise SystemExit(main())
