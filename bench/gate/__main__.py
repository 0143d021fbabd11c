"""python -m bench.gate: see bench/gate/__init__.py."""
import sys

from bench.gate import main

sys.exit(main())
