"""The demo's Celery app, for the worker processes the demo starts.

``python -m celery_bulkhead.demo`` runs ``celery -A celery_bulkhead.demo.app
worker ...`` (plain Celery) and ``celery -A celery_bulkhead.demo.app bulkhead
worker`` (bulkheads) with the run's :class:`~celery_bulkhead.demo.story.DemoConfig`
in the environment variable ``CELERY_BULKHEAD_DEMO_CONFIG``.  Reading it here,
at import, is what a ``-A`` module is for; nothing else in the package imports
this module.
"""

from __future__ import annotations

from .story import DemoConfig, make_app

__all__ = ["app"]

app = make_app(DemoConfig.from_environ())
