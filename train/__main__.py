"""``python -m train --config configs/X.yml [--set section.key=value ...]``."""

import sys

from .cli import main

sys.exit(main())
