"""Repository-level pytest set-up: make ``native_ref`` and ``benchmarks`` importable."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
