"""``python -m adaspark``: the same command line as the ``adaspark`` script."""

import sys

from adaspark.cli import main

if __name__ == "__main__":
    sys.exit(main())
