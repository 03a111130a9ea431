"""`python -m vtprune ...` = the `vtprune` command (for a checkout on PYTHONPATH, without an install)."""
import sys

from .cli import main

sys.exit(main())
