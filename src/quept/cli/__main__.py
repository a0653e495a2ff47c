"""``python -m quept.cli``: the same as the ``quept`` command."""

import sys

from quept.cli import main

sys.exit(main())
