"""`python -m bench`: run the benchmark suite (see bench/cli.py for the options)."""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
