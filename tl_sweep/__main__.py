"""``python -m tl_sweep``: the ``tl-sweep`` command."""

import sys

from tl_sweep.cli import main

sys.exit(main())
