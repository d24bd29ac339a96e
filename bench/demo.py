"""``make demo``: a real registry on loopback, a generated image pushed to it, and every
layer fetched with ``p2pdist get`` — each piece and each blob verified — as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pdist.config import parse_size

from .image import make_image, push_image
from .localregistry import LocalRegistry
from .tools import ensure_registry_installed

__all__ = ["run_demo"]


def _p2pdist(*args: str, data_dir: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "p2pdist", *args, "--data-dir", data_dir, "--no-progress"]
    print("$ p2pdist " + " ".join(a for a in args))
    return subprocess.run(cmd, text=True, check=False)


def run_demo(*, size: str, layers: int, out: str) -> int:
    if not ensure_registry_installed():
        return 2
    total = parse_size(size)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo: generating a {layers}-layer image of {total / 2**20:.0f} MiB")
    image = make_image(size=total, layers=layers, layer_format="gzip", seed=1)
    with LocalRegistry() as reg, tempfile.TemporaryDirectory(prefix="p2pdist-demo-") as data:
        print(f"demo: registry running at {reg.url}; pushing demo/app:latest")
        push_image(reg.url, "demo/app", "latest", image)
        manifest_file = out_dir / "manifest.json"
        got = _p2pdist(
            "get",
            f"{reg.host}/demo/app:latest",
            "--manifest",
            "-O",
            str(manifest_file),
            data_dir=data,
        )
        if got.returncode:
            return got.returncode
        manifest = json.loads(manifest_file.read_bytes())
        blobs = [manifest["config"], *manifest["layers"]]
        started = time.perf_counter()
        for n, blob in enumerate(blobs):
            name = "config.json" if n == 0 else f"layer-{n}.tar.gz"
            done = _p2pdist(
                "get",
                f"{reg.host}/demo/app@{blob['digest']}",
                "-O",
                str(out_dir / name),
                data_dir=data,
            )
            if done.returncode:
                return done.returncode
        seconds = time.perf_counter() - started
        fetched = sum(int(b["size"]) for b in blobs)
        print(
            f"demo: {len(blobs)} blobs, {fetched / 2**20:.1f} MiB verified in {seconds:.2f}s "
            f"({fetched / seconds / 1e6:.0f} MB/s including process start-up); files in {out_dir}/"
        )
        again = time.perf_counter()
        _p2pdist(
            "get",
            f"{reg.host}/demo/app@{blobs[-1]['digest']}",
            "-O",
            str(out_dir / "again.tar.gz"),
            data_dir=data,
        )
        print(
            f"demo: second get of the same layer served from the local store in "
            f"{time.perf_counter() - again:.2f}s"
        )
    return 0
