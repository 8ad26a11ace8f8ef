"""The worker side: the bootstep, the Request class and the pool's metrics.

A process boundary: publishing code never imports this package (the
``Bulkhead`` registers the bootstep by name), and nothing here is loaded
until a ``celery worker`` starts.
"""
