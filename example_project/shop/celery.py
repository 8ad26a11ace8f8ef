"""The Celery app and its bulkhead, configured from ``shop.settings``.

``celery -A shop ...`` finds the app through ``shop/__init__.py``.  The
pools are declared in the settings module (``bulkhead_pools``), not here, as
in a Django project: see ``shop/settings.py`` for what each pool isolates and
why.
"""

from celery import Celery

from celery_bulkhead import Bulkhead

app = Celery("shop")
# In Django: app.config_from_object("django.conf:settings", namespace="CELERY").
app.config_from_object("shop.settings")

# After config_from_object: the Bulkhead reads bulkhead_pools and the other
# bulkhead_* settings now, and refuses a bad one with a ConfigurationError.
bulkhead = Bulkhead(app)
