"""``python -m fedhe.cli``: the same as the ``fedhe`` console script."""

import sys

from fedhe.cli.main import main

sys.exit(main())
