"""`python -m seamless_core ...` runs the `seamless` command."""

import sys

from .cli import main

sys.exit(main())
