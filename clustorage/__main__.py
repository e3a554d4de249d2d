"""``python -m clustorage``: the same as the ``clustorage`` command."""

import sys

from .cli import main

sys.exit(main())
