"""``python -m batchlab``: the same as the ``batchlab`` command."""

import sys

from batchlab.cli import main

sys.exit(main())
