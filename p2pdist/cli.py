"""The ``p2pdist`` command line.

Exit codes (every subcommand): 0 ok, 1 verification failed, 2 usage or configuration
error, 3 not found or unauthorized, 4 network, upstream or local storage error,
130 interrupted.  Errors are one line on stderr; ``P2PDIST_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

import trio

from . import __version__
from .config import load_node_config
from .digest import Digest
from .errors import EXIT_NETWORK, EXIT_USAGE, P2PDistError, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n"):
        raise argparse.ArgumentTypeError(f"invalid header {text!r}: expected 'Name: value'")
    if "\r" in value or "\n" in value:
        raise argparse.ArgumentTypeError("header values cannot contain line breaks")
    return name.strip(), value.strip()


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pdist", description="Peer-to-peer container image distribution.")
    parser.add_argument("--version", action="version", version=f"p2pdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    get = sub.add_parser(
        "get",
        help="fetch one blob, manifest or URL to a file, verified",
        description=(
            "Fetch REGISTRY/REPO@sha256:HEX (a blob), REGISTRY/REPO[:TAG|@DIGEST] --manifest, "
            "or an http(s) URL, in parallel pieces, verifying every byte."
        ),
    )
    get.add_argument("target", help="REGISTRY/REPO@sha256:HEX, REGISTRY/REPO[:TAG] or a URL")
    get.add_argument("-O", "--output", required=True, help="output file ('-' for stdout)")
    get.add_argument("--manifest", action="store_true", help="fetch the manifest of an image")
    get.add_argument("--platform", help="with --manifest: resolve an index to os/arch[/variant]")
    get.add_argument("--digest", type=_digest, help="expected sha256 of a URL's content")
    get.add_argument(
        "-H",
        "--header",
        type=_header,
        action="append",
        default=[],
        help="extra request header for a URL, 'Name: value' (repeatable)",
    )
    get.add_argument("--piece-size", help="piece size, e.g. 4MiB (default from config)")
    get.add_argument("--concurrency", type=_positive, help="parallel range requests")
    get.add_argument("--insecure", action="store_true", help="skip TLS certificate checks")
    get.add_argument("--data-dir", help="piece store directory")
    get.add_argument("--config", help="config file (TOML)")
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    get.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return parser


def _run_get(args: argparse.Namespace) -> None:
    from .get import GetRequest, run_get

    config = load_node_config(
        args.config,
        overrides={
            "data_dir": args.data_dir,
            "piece_size": args.piece_size,
            "concurrency": args.concurrency,
        },
    )
    if args.digest is not None and not args.target.startswith(("http://", "https://")):
        raise UsageError("--digest applies to URLs; for a registry blob use REPO@sha256:<hex>")
    if args.platform and not args.manifest:
        raise UsageError("--platform applies with --manifest")
    request = GetRequest(
        target=args.target,
        output=args.output,
        manifest=args.manifest,
        digest=args.digest,
        headers=dict(args.header),
        insecure=args.insecure,
        platform=args.platform,
        progress=not args.no_progress,
        quiet=args.quiet,
    )
    trio.run(run_get, request, config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "get":
            _run_get(args)
        return 0
    except P2PDistError as exc:
        print(f"p2pdist: error: {exc}", file=sys.stderr)
        if os.environ.get("P2PDIST_DEBUG"):
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        print("p2pdist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        print(
            f"p2pdist: internal error: {type(exc).__name__}: {exc} "
            "(set P2PDIST_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        if os.environ.get("P2PDIST_DEBUG"):
            traceback.print_exc()
        return EXIT_NETWORK


if __name__ == "__main__":
    sys.exit(main())
