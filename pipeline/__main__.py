"""``python -m pipeline ...`` is the ``noisy-student`` command (for ``ray job submit -- python -m pipeline``)."""

import sys

from pipeline.cli import main

sys.exit(main())
