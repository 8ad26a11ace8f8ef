"""Reports: long, rare, and fine to wait.

No decorator names a pool here.  Every task in this module is called
``shop.reports.<function>``, and the reports pool claims the pattern
``shop.reports.*`` (``tasks=[...]`` in ``shop/settings.py``): this is how
tasks that already exist move into a pool without touching their code.
"""

from __future__ import annotations

import time

from .celery import app


@app.task
def daily_sales(day: str) -> str:
    """Build the sales report of one day (``shop.reports.daily_sales``)."""
    time.sleep(5)  # the big query
    return f"sales report for {day}"
