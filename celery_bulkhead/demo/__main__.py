"""``python -m celery_bulkhead.demo``: see :mod:`celery_bulkhead.demo`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
