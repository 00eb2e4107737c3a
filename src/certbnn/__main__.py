"""``python -m certbnn`` is the same as the ``certbnn`` command."""

from certbnn.cli import main

raise SystemExit(main())
