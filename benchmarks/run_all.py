"""Run every benchmark, one after the other: ``python benchmarks/run_all.py``.

Options are passed on to each (``--quick`` for the smoke versions, ``--out``
for another results folder).  The full run takes about ten minutes on a
2-core machine; nothing else should be running while it does.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ("hot_path", "scale", "fleet", "faults")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks in turn; stop at the first that fails."""
    args = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()

    for name in BENCHMARKS:
        print(f"== {name} ==", file=sys.stderr, flush=True)
        status = importlib.import_module(name).main(args)
        if status:
            return int(status)

    print(
        f"== all benchmarks done in {time.monotonic() - started:.0f} s ==",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
