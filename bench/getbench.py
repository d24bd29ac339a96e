"""``python -m bench get-vs-curl``: one blob, one loopback registry, fetched alternately by
curl and by ``p2pdist get`` (parallel ranges, per-piece sha256, whole-blob sha256, atomic
placement), each into a file.  Reports medians and the ratio of the two, measured side by
side in one run because these machines are noisy."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pdist.config import parse_size

from .image import push_blob
from .localregistry import LocalRegistry
from .tools import ensure_registry_installed

__all__ = ["run_get_vs_curl"]


def _timed(cmd: list[str], settle: float) -> float:
    # Same starting state for both commands: dirty pages written back, and a pause so that
    # memory freed by the previous run has settled.  (On this VM freed guest pages go back
    # to the host and fault in again on first touch; without the pause, whichever command
    # runs right after a delete writes into warm pages and looks 2x faster.)
    os.sync()
    time.sleep(settle)
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"bench: {cmd[0]} failed ({done.returncode}): {done.stderr[-500:]!r}")
    return seconds


def run_get_vs_curl(
    *,
    size: str,
    rounds: int,
    concurrency: int | None,
    piece_size: str | None,
    out: str,
    settle: float = 5.0,
) -> int:
    if not ensure_registry_installed():
        return 2
    if shutil.which("curl") is None:
        print("bench: needs curl (apt-get install -y curl)", file=sys.stderr)
        return 2
    nbytes = parse_size(size)
    print(f"bench: generating a {nbytes / 2**20:.0f} MiB random blob")
    rng = random.Random(42)
    blob = b"".join(rng.randbytes(min(64 << 20, nbytes - o)) for o in range(0, nbytes, 64 << 20))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    results: dict[str, list[float]] = {"curl": [], "p2pdist": []}
    with LocalRegistry() as reg, tempfile.TemporaryDirectory(prefix="p2pdist-bench-") as tmp:
        push_blob(reg.url, "bench/blob", blob, digest=digest)
        del blob
        url = f"{reg.url}/v2/bench/blob/blobs/{digest}"
        target = Path(tmp) / "out"
        get = [
            sys.executable,
            "-m",
            "p2pdist",
            "get",
            f"{reg.host}/bench/blob@{digest}",
            "-O",
            str(target),
            "--no-progress",
            "-q",
        ]
        if concurrency:
            get += ["--concurrency", str(concurrency)]
        if piece_size:
            get += ["--piece-size", piece_size]
        curl = ["curl", "-sfL", "-o", str(target), url]
        _timed(curl, 0)  # warm the registry's page cache
        for n in range(rounds):
            results["curl"].append(_timed(curl, settle))
            target.unlink()
            data_dir = Path(tmp) / f"store-{n}"
            results["p2pdist"].append(_timed([*get, "--data-dir", str(data_dir)], settle))
            shutil.rmtree(data_dir)
            target.unlink()
            print(
                f"  round {n + 1}: curl {results['curl'][-1]:.2f}s, "
                f"p2pdist get {results['p2pdist'][-1]:.2f}s"
            )
    ratios = [p / c for p, c in zip(results["p2pdist"], results["curl"], strict=True)]
    summary: dict[str, float | int | list[float] | None] = {
        "size_bytes": nbytes,
        "rounds": rounds,
        "curl_seconds": results["curl"],
        "p2pdist_seconds": results["p2pdist"],
        "curl_median_mb_s": nbytes / statistics.median(results["curl"]) / 1e6,
        "p2pdist_median_mb_s": nbytes / statistics.median(results["p2pdist"]) / 1e6,
        "time_ratio_median": statistics.median(ratios),
        "cpus": os.cpu_count(),
        "settle_seconds": settle,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "get-vs-curl.json").write_text(json.dumps(summary, indent=2) + "\n")
    ratio = statistics.median(ratios)
    print(
        f"bench: {nbytes / 2**20:.0f} MiB blob, median of {rounds}: "
        f"curl {nbytes / statistics.median(results['curl']) / 1e6:.0f} MB/s, "
        f"p2pdist get {nbytes / statistics.median(results['p2pdist']) / 1e6:.0f} MB/s; "
        f"p2pdist/curl time ratio {ratio:.2f} (speed {1 / ratio:.2f} x curl)"
    )
    return 0
