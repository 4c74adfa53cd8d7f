"""``python -m unirobust ...``: the same as the ``unirobust`` command."""

import sys

from .cli import main

sys.exit(main())
