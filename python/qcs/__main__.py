"""``python -m qcs`` is the ``qcs`` command."""

from .cli import main

raise SystemExit(main())
