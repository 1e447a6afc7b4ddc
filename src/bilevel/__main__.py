"""``python -m bilevel``: the ``bilevel`` command line (see :mod:`bilevel.cli`)."""

import sys

from .cli import main

sys.exit(main())
