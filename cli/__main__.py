"""``python -m hartkit.cli``: the same as the ``hartkit`` command (tests and bench subprocesses use it)."""

import sys

from hartkit.cli import main

sys.exit(main())
