"""``python -m bilevel.data [--data-dir DIR]``: show which datasets are available."""

from __future__ import annotations

import argparse

from .sources import format_report, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bilevel.data",
        description="List the datasets, where they were found, or how to install them.",
    )
    parser.add_argument("--data-dir", default=None, help="directory searched first")
    args = parser.parse_args(argv)
    print(format_report(report(args.data_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
