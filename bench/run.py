"""`python bench/run.py ...` is `python -m bench ...` from the checkout: the benchmark's old entry point."""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory is sys.path[0]: the package's modules would shadow the stdlib and
# redis-py (bench/profiling.py, bench/load.py), so the checkout takes its place and `bench` is imported as a package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
