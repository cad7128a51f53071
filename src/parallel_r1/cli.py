"""The `parallel-r1` command line. Each sub-command is a thin wrapper over a module's public API."""

from __future__ import annotations

import argparse
import logging
import sys


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-r1", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="strictly validate the parallel format of the responses in a JSONL file")
    check.add_argument("file", help="JSONL file, one record a line")
    check.add_argument("--field", default="response", help="record field holding the response (default: response)")
    check.add_argument("--json", action="store_true", help="print one JSON object per record")
    check.set_defaults(func=_cmd_check)

    return parser


def _cmd_check(args) -> int:
    import json

    from parallel_r1.format import InputError, check_file, check_report

    try:
        results = check_file(args.file, args.field)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print(check_report(args.file, results))
    return 0 if all(r["valid"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
