"""``python -m bench.flood``: the flood generator's command line (bench.flood.cli.main)."""

from __future__ import annotations

import sys

from bench.flood.cli import main

sys.exit(main())
