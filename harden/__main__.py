"""Allow `python -m harden`, identical to the `harden` console script."""

import sys

from harden.cli import main

sys.exit(main())
