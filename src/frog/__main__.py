"""``python -m frog`` is the ``frog`` command."""

import sys

from .cli import main

sys.exit(main())
