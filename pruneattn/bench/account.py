"""Kept so that ``pruneattn.bench.account`` imports keep working: the code is in :mod:`pruneattn.bench.static`."""
from pruneattn.bench.static.account import *  # noqa: F401,F403
from pruneattn.bench.static.hooks import *  # noqa: F401,F403
from pruneattn.bench.static.nxn import *  # noqa: F401,F403
from pruneattn.bench.static.traffic import *  # noqa: F401,F403
from pruneattn.bench.static.report import markdown  # noqa: F401
from pruneattn.bench.static.cli import main  # noqa: F401
