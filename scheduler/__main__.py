"""``python -m scheduler [--listen HOST:PORT]``: the same as ``p2pdist scheduler``."""

import sys

from p2pdist.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
