"""``python -m optcc``: see optcc.cli."""

import sys

from optcc.cli import main

sys.exit(main())
