"""``python -m bilevel.data [--data-dir DIR]``: show which datasets are available."""

from __future__ import annotations

import argparse
import sys

from .errors import DatasetError
from .sources import format_report, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bilevel.data",
        description="List the datasets, where they were found, or how to install them.",
    )
    parser.add_argument("--data-dir", default=None, help="directory searched first")
    args = parser.parse_args(argv)
    try:
        rows = report(args.data_dir)
    except DatasetError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
