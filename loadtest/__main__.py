"""`python -m duetserve.loadtest run|sweep ...` (see cli.py)."""

import sys

from duetserve.loadtest.cli import main

sys.exit(main())
