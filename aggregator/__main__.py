"""``python -m aggregator ...`` is ``fl-aggregator ...``."""

import sys

from aggregator.cli import main

sys.exit(main())
