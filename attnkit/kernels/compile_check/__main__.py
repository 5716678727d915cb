"""``python -m attnkit.kernels.compile_check``: the compile report (see :mod:`.cli`)."""

from .cli import main

raise SystemExit(main())
