"""``python -m pruneattn.bench``: see :mod:`pruneattn.bench`."""
import sys

from pruneattn.bench import main

sys.exit(main())
