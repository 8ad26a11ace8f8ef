"""Imported only by workers (``include=``): a typo'd pool name hides here."""

from celery import shared_task


@shared_task(bulkhead="oi", name="broken.fetch")
def fetch() -> None: ...
