"""``python -m tokenfleet``: the ``tokenfleet`` command."""

from ._cli import main

raise SystemExit(main())
