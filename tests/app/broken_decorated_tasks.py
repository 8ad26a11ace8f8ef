"""Imported only by workers (``include=``): ``@app.task(bulkhead=...)`` with a typo."""

from tests.app.broken_decorated import app


@app.task(bulkhead="paymnets")
def charge(order_id: int) -> None: ...
