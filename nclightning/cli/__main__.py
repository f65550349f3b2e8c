"""``python -m nclightning.cli``: the ``nclightning`` command."""

import sys

from nclightning.cli import main

sys.exit(main())
