"""The ``p2pdist`` command line.

Exit codes (every subcommand): 0 ok, 1 verification failed, 2 usage or configuration
error, 3 not found or unauthorized, 4 network, upstream or local storage error,
130 interrupted.  Errors are one line on stderr; ``P2PDIST_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from . import __version__
from .config import NodeConfig, load_node_config
from .digest import Digest
from .errors import EXIT_NETWORK, EXIT_USAGE, P2PDistError, UsageError, collapse_groups

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other error: "p2pdist: error: ..." (which subcommand's
        # --help to read is named at the end).
        self.exit(EXIT_USAGE, f"p2pdist: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def _platform(text: str) -> str:
    from .registry import parse_platform

    try:
        parse_platform(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _daemon_url(text: str) -> str:
    """``--daemon``/``$P2PDIST_DAEMON``: an http(s) base URL ("" = unset: standalone)."""
    if text and re.fullmatch(r"https?://[^\s/?#@]+/?", text) is None:
        raise argparse.ArgumentTypeError(
            f"invalid daemon URL {text[:80]!r}: expected http://HOST:PORT"
        )
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 100, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < 10**7:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _add_fetch_flags(parser: argparse.ArgumentParser, *, progress: str) -> None:
    """The flags ``get`` and ``pull`` share: how to fetch, where to keep pieces, output."""
    parser.add_argument("--piece-size", help="piece size, e.g. 4MiB (default from config)")
    parser.add_argument("--concurrency", type=_positive, help="parallel range requests per blob")
    parser.add_argument("--insecure", action="store_true", help="skip TLS certificate checks")
    parser.add_argument("--data-dir", help="piece store directory (standalone)")
    parser.add_argument("--config", help="config file (TOML)")
    parser.add_argument("--no-progress", action="store_true", help=progress)
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument(
        "--daemon",
        default=os.environ.get("P2PDIST_DAEMON"),
        type=_daemon_url,
        help="local daemon API URL (default $P2PDIST_DAEMON); standalone when unset",
    )


def _fetch_config(args: argparse.Namespace) -> NodeConfig:
    """The node configuration of a ``get`` or ``pull``: file, environment, their flags."""
    return load_node_config(
        args.config,
        overrides={
            "data_dir": args.data_dir,
            "piece_size": args.piece_size,
            "concurrency": args.concurrency,
        },
    )


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
    get.add_argument(
        "--platform", type=_platform, help="with --manifest: resolve an index to os/arch[/variant]"
    )
    get.add_argument("--digest", type=_digest, help="expected sha256 of a URL's content")
    get.add_argument(
        "-H",
        "--header",
        type=_header,
        action="append",
        default=[],
        help="extra request header for a URL, 'Name: value' (repeatable)",
    )
    _add_fetch_flags(get, progress="no progress bar")

    pull = sub.add_parser(
        "pull",
        help="pull an image through the swarm and load it into Docker",
        description="Resolve IMAGE's manifest (an index to --platform), fetch its config and "
        "layers in parallel (through the local daemon's swarm with --daemon), verify every "
        "digest, then load the image into Docker and tag it - or write an OCI image layout "
        "with --output.",
    )
    pull.add_argument("image", help="[REGISTRY/]REPO[:TAG|@DIGEST]")
    pull.add_argument("--output", help="write an OCI image layout to this directory instead")
    pull.add_argument("--platform", type=_platform, help="os/arch[/variant] to pick from an index")
    pull.add_argument(
        "--docker-host",
        help="Docker engine (default $DOCKER_HOST, else unix:///var/run/docker.sock)",
    )
    _add_fetch_flags(pull, progress="no per-layer progress lines")

    preheat = sub.add_parser(
        "preheat",
        help="warm an image on chosen nodes before a rollout (through the scheduler)",
        description="Ask the scheduler to have one node (default), --nodes N, --percent P or "
        "--all of the nodes fetch every blob of IMAGE into their stores through the swarm; "
        "print progress until every chosen node holds every blob, verified.",
    )
    preheat.add_argument("image", help="[REGISTRY/]REPO[:TAG|@DIGEST]")
    preheat.add_argument(
        "--scheduler",
        default=os.environ.get("P2PDIST_SCHEDULER"),
        metavar="URL",
        help="scheduler URL (default $P2PDIST_SCHEDULER, else the config's first scheduler)",
    )
    which = preheat.add_mutually_exclusive_group()
    which.add_argument("--nodes", type=_positive, metavar="N", help="this many nodes")
    which.add_argument(
        "--percent", type=_percent, metavar="P", help="this percentage of the nodes (0-100]"
    )
    which.add_argument("--all", action="store_true", help="every registered node")
    preheat.add_argument(
        "--platform", type=_platform, help="os/arch[/variant] to pick from an index"
    )
    preheat.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="give up after this many seconds (600)",
    )
    preheat.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between progress polls (1)",
    )
    preheat.add_argument("--config", help="config file (TOML)")
    preheat.add_argument(
        "--cluster-token-file", help="file holding the cluster's shared token (cluster auth)"
    )
    preheat.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    daemon = sub.add_parser(
        "daemon",
        help="run the node daemon (peer server, local API, registry proxy, scheduler link)",
        description="Run the node daemon: serves verified pieces to peers and blobs to the "
        "local CLI, fetching through the swarm.",
    )
    daemon.add_argument("--config", help="config file (TOML)")
    daemon.add_argument("--data-dir", help="piece store directory")
    daemon.add_argument(
        "--scheduler", action="append", dest="schedulers", help="scheduler URL (repeatable)"
    )
    daemon.add_argument("--peer-listen", help="HOST:PORT of the peer server (0.0.0.0:65002)")
    daemon.add_argument("--advertise", help="address peers reach this node at (HOST[:PORT])")
    daemon.add_argument("--api-listen", help="HOST:PORT of the local API (127.0.0.1:65003)")
    daemon.add_argument(
        "--proxy-listen",
        help="HOST:PORT of the registry proxy (127.0.0.1:65001; 'off' for none)",
    )
    daemon.add_argument(
        "--upstream",
        help="registry URL the proxy pulls from when a request names none (no ?ns=), "
        "e.g. https://registry-1.docker.io",
    )
    daemon.add_argument("--host-id", help="this node's id (default: hostname-address)")
    daemon.add_argument("--zone", help="zone label (parents in the same zone are preferred)")
    daemon.add_argument("--piece-size", help="piece size, e.g. 4MiB")
    daemon.add_argument("--concurrency", type=_positive, help="parallel piece fetches")
    daemon.add_argument("--upload-slots", type=_positive, help="concurrent uploads to peers")
    daemon.add_argument(
        "--cluster-token-file", help="file holding the cluster's shared token (cluster auth)"
    )
    daemon.add_argument("--download-rate", help="receive at most this, e.g. 100Mbit or 12MiB/s")
    daemon.add_argument("--upload-rate", help="send to peers at most this, e.g. 100Mbit")
    daemon.add_argument("--source-rate", help="fetch from registries at most this, e.g. 50Mbit")
    daemon.add_argument("--cache-ttl", help="evict blobs unused this long, e.g. 24h ('off')")
    daemon.add_argument("--cache-quota", help="disk quota of the blob cache, e.g. 20GiB ('off')")
    daemon.add_argument(
        "--cache-high-watermark", help="evict LRU blobs above this fraction of the quota (0.9)"
    )
    daemon.add_argument(
        "--cache-low-watermark", help="... down to this fraction of the quota (0.8)"
    )
    daemon.add_argument("--gc-interval", help="seconds between cache GC passes, e.g. 60s")
    daemon.add_argument(
        "--log-level", help="debug, info, warning, error (default: the config's, else info)"
    )
    daemon.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or JSON objects (default: config log_format, "
        "$P2PDIST_LOG_FORMAT, else text)",
    )

    setup = sub.add_parser(
        "setup",
        help="point dockerd or containerd at the node's registry proxy",
        description="Print (or --write) the runtime configuration that pulls through the "
        "node's proxy.",
    )
    setup.add_argument("runtime", choices=["docker", "containerd"])
    setup.add_argument("--proxy", default="http://127.0.0.1:65001", help="the proxy's URL")
    setup.add_argument("--registry", help="containerd: the registry host to route (e.g. docker.io)")
    setup.add_argument("--write", action="store_true", help="write the file (keeps a .bak)")
    setup.add_argument(
        "--path",
        help="file (docker: /etc/docker/daemon.json) or certs.d dir (containerd: "
        "/etc/containerd/certs.d)",
    )

    imp = sub.add_parser(
        "import",
        help="seed the node's store from a docker save archive or an OCI layout",
        description="Verify every blob of a `docker save` tar or an OCI image layout (dir or "
        "tar), put them in the node's store and record the manifest and tags, so the node's "
        "proxy and its peers serve the image with no registry.",
    )
    imp.add_argument("archive", help="docker save tar, OCI layout directory or OCI layout tar")
    imp.add_argument(
        "--tag",
        action="append",
        default=[],
        help="REGISTRY/REPO:TAG to record (repeatable; replaces the archive's own tags)",
    )
    imp.add_argument("--data-dir", help="the node's data directory")
    imp.add_argument("--config", help="config file (TOML)")

    health = sub.add_parser(
        "health",
        help="check that the local daemon (or --url) answers /healthz",
        description="GET /healthz (--ready: /readyz) on the daemon's local API (its address "
        "from --config / $P2PDIST_CONFIG / $P2PDIST_API_LISTEN) or on --url: exit 0 when it "
        "answers 200, 4 otherwise.  The container image's HEALTHCHECK.",
    )
    health.add_argument("--url", help="check this URL instead (e.g. a scheduler's /healthz)")
    health.add_argument("--ready", action="store_true", help="check /readyz instead of /healthz")
    health.add_argument("--config", help="config file (TOML) of the daemon to check")
    health.add_argument(
        "--timeout", type=_positive, default=5, help="seconds to wait for the answer (5)"
    )

    sched = sub.add_parser(
        "scheduler",
        help="run the scheduler",
        description="Run the scheduler: the swarm's picture and its decisions.",
    )
    sched.add_argument("--config", help="config file (TOML; also $P2PDIST_SCHEDULER_CONFIG)")
    sched.add_argument("--listen", help="HOST:PORT (0.0.0.0:65004)")
    sched.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sched.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("P2PDIST_LOG_FORMAT") or "text",
        help="log lines as text or JSON objects (default $P2PDIST_LOG_FORMAT, else text)",
    )
    sched.add_argument(
        "--cluster-token-file",
        help="file holding the cluster's shared token: events must carry it "
        "(also $P2PDIST_CLUSTER_TOKEN_FILE, $P2PDIST_CLUSTER_TOKEN)",
    )
    return parser


def _run_get(args: argparse.Namespace) -> None:
    from .get import GetRequest, run_get

    config = _fetch_config(args)
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
        daemon=args.daemon or None,
    )
    _run_interruptibly(run_get, request, config)


def _run_pull(args: argparse.Namespace) -> None:
    from .pull import PullRequest, run_pull

    config = _fetch_config(args)
    request = PullRequest(
        image=args.image,
        output=args.output,
        platform=args.platform,
        daemon=args.daemon or None,
        docker_host=args.docker_host,
        insecure=args.insecure,
        progress=not args.no_progress,
        quiet=args.quiet,
    )

    async def pull() -> None:
        await run_pull(request, config)

    _run_interruptibly(pull)


def _run_preheat(args: argparse.Namespace) -> None:
    from .preheat import PreheatRequest, run_preheat

    config = load_node_config(
        args.config, overrides={"cluster_token_file": args.cluster_token_file}
    )
    scheduler = args.scheduler or (config.schedulers[0] if config.schedulers else None)
    if not scheduler:
        raise UsageError(
            "no scheduler: give --scheduler URL (or $P2PDIST_SCHEDULER, or schedulers in the "
            "config)"
        )
    request = PreheatRequest(
        image=args.image,
        scheduler=scheduler,
        nodes=args.nodes,
        percent=args.percent,
        all=args.all,
        platform=args.platform,
        timeout=args.timeout,
        interval=args.interval,
        quiet=args.quiet,
        token=config.cluster_token,
    )

    async def preheat() -> None:
        await run_preheat(request)

    _run_interruptibly(preheat)


def _run_interruptibly(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """``trio.run(fn, *args)``, where Ctrl-C cancels everything promptly (also tasks
    waiting in a nursery, which trio's own KeyboardInterrupt delivery can only reach at the
    main task's next checkpoint) and then raises KeyboardInterrupt."""
    interrupted = False

    async def main() -> None:
        nonlocal interrupted
        with (
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
            collapse_groups(),
        ):
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                await fn(*args)
                nursery.cancel_scope.cancel()

    trio.run(main)
    if interrupted:
        raise KeyboardInterrupt


def _logging(level: str, fmt: str) -> None:
    import logging

    from .logs import configure_logging

    configure_logging(level, fmt)  # UsageError for a bad level or format
    logging.captureWarnings(True)  # Python's warnings become log lines too


def _run_daemon(args: argparse.Namespace) -> None:
    from .daemon import run_daemon

    overrides = {
        "data_dir": args.data_dir,
        "schedulers": args.schedulers,
        "peer_listen": args.peer_listen,
        "advertise": args.advertise,
        "api_listen": args.api_listen,
        "proxy_listen": args.proxy_listen,
        "upstream": args.upstream,
        "host_id": args.host_id,
        "zone": args.zone,
        "piece_size": args.piece_size,
        "concurrency": args.concurrency,
        "upload_slots": args.upload_slots,
        "download_rate": args.download_rate,
        "upload_rate": args.upload_rate,
        "source_rate": args.source_rate,
        "cluster_token_file": args.cluster_token_file,
        "cache_ttl": args.cache_ttl,
        "cache_quota": args.cache_quota,
        "cache_high_watermark": args.cache_high_watermark,
        "cache_low_watermark": args.cache_low_watermark,
        "gc_interval": args.gc_interval,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }

    def reload() -> NodeConfig:  # SIGHUP: the file again, under the same env and flags
        return load_node_config(args.config, overrides=overrides)

    config = reload()
    _logging(config.log_level or "info", config.log_format)
    trio.run(run_daemon, config, reload)


def _run_setup(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .setup import containerd_hosts_toml, docker_daemon_json, write_with_backup

    if args.runtime == "docker":
        path = Path(args.path or "/etc/docker/daemon.json")
        try:
            existing = path.read_text() if path.exists() else None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        content = docker_daemon_json(existing, args.proxy)
    else:
        if not args.registry:
            raise UsageError("setup containerd needs --registry HOST (e.g. docker.io)")
        path = Path(args.path or "/etc/containerd/certs.d") / args.registry / "hosts.toml"
        content = containerd_hosts_toml(args.registry, args.proxy)
    if not args.write:
        print(content, end="")
        return
    try:
        backup = write_with_backup(path, content)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    print(f"wrote {path}" + (f" (previous version kept as {backup})" if backup else ""))
    if args.runtime == "docker":
        print("restart dockerd to apply it (e.g. systemctl restart docker)")


def _run_import(args: argparse.Namespace) -> None:
    from .importer import import_archive, summary

    config = load_node_config(args.config, overrides={"data_dir": args.data_dir})
    result = import_archive(
        args.archive,
        config.data_dir,
        tags=args.tag,
        piece_size=config.piece_size,
        say=lambda line: print(line, flush=True),
    )
    for line in summary(result):
        print(line)


def _run_health(args: argparse.Namespace) -> None:
    from .healthcheck import check_health, health_url

    url = args.url or health_url(load_node_config(args.config), ready=args.ready)
    if args.url and args.ready:
        raise UsageError("--ready applies without --url (give the /readyz URL instead)")
    body = check_health(url, timeout=args.timeout)
    print(f"ok {url} {body}".rstrip())


def _run_scheduler(args: argparse.Namespace) -> None:
    from scheduler import load_scheduler_config
    from scheduler.service import run_scheduler

    from .config import split_hostport

    if args.log_format not in ("text", "json"):  # from $P2PDIST_LOG_FORMAT
        raise UsageError(f"invalid log format {args.log_format!r}: expected text or json")
    _logging(args.log_level, args.log_format)
    config = load_scheduler_config(
        args.config,
        overrides={"listen": args.listen, "cluster_token_file": args.cluster_token_file},
    )
    host, port = split_hostport(config.listen, what="listen")
    trio.run(run_scheduler, host, port, config.cluster_token, config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "get":
            _run_get(args)
        elif args.command == "pull":
            _run_pull(args)
        elif args.command == "preheat":
            _run_preheat(args)
        elif args.command == "daemon":
            _run_daemon(args)
        elif args.command == "scheduler":
            _run_scheduler(args)
        elif args.command == "setup":
            _run_setup(args)
        elif args.command == "import":
            _run_import(args)
        elif args.command == "health":
            _run_health(args)
        return 0
    except P2PDistError as exc:
        print(f"p2pdist: error: {_one_line(str(exc))}", file=sys.stderr)
        if os.environ.get("P2PDIST_DEBUG"):
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        print("p2pdist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        print(
            f"p2pdist: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(set P2PDIST_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        if os.environ.get("P2PDIST_DEBUG"):
            traceback.print_exc()
        return EXIT_NETWORK


if __name__ == "__main__":
    sys.exit(main())
