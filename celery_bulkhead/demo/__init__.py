"""The one-command demo: ``python -m celery_bulkhead.demo``.

It runs one shop's Celery workload twice on this machine, with real worker
processes: once as plain Celery (every task on one queue, one worker) and
once with bulkheads (a pool per kind of work, a breaker, a tenant limit,
queue caps), while a third-party API the webhooks call hangs, fails and
recovers, and one tenant floods the reports.  Then it prints what it
measured, per run and pool, and draws a chart.  See docs/demo.md.

The modules:

* :mod:`~celery_bulkhead.demo.story`: the app (plain or with bulkheads) and the workload;
* :mod:`~celery_bulkhead.demo.app`: the ``-A`` module of the demo's workers;
* :mod:`~celery_bulkhead.demo.broker`: the Redis it runs on, found or started;
* :mod:`~celery_bulkhead.demo.downstream`: the API that hangs, fails and recovers;
* :mod:`~celery_bulkhead.demo.processes`: every process started, and stopped;
* :mod:`~celery_bulkhead.demo.run`: the two runs: workers, warm-up, load, drain, stop;
* :mod:`~celery_bulkhead.demo.producer`: sends the workload, notes what admission said;
* :mod:`~celery_bulkhead.demo.measure`: what a run measures (records, depths, metrics);
* :mod:`~celery_bulkhead.demo.progress`: the live display;
* :mod:`~celery_bulkhead.demo.report`: the table, the verdict, the chart;
* :mod:`~celery_bulkhead.demo.cli`: the options and the whole demo.

It needs the ``demo`` extra (redis-py, matplotlib, fakeredis with Lua):
``pip install 'celery-bulkhead[demo]'``.  Importing this package imports none
of them.
"""

from __future__ import annotations

__all__: list[str] = []
