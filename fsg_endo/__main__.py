"""``python -m fsg_endo`` is the ``fsg-endo`` command."""

from fsg_endo.cli import main

raise SystemExit(main())
