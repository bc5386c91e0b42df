"""``python -m megabyte`` = the ``megabyte`` console script."""
import sys

from .cli import main

sys.exit(main())
