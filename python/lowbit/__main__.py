"""``python -m lowbit``: see :mod:`lowbit.cli`."""
import sys

from .cli import main

sys.exit(main())
