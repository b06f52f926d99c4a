"""``python -m label_relaxation``: the command line."""

import sys

from label_relaxation.tools.cli import main

sys.exit(main())
