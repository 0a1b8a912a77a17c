"""The counter server's client library, and the load-generating client.

Applications use the library (docs/library.md)::

    from counter_server.client import CounterClient

    with CounterClient("127.0.0.1:8080") as counter:
        counter.increment()

``CounterClient`` serves threads and greenlets, ``AsyncCounterClient``
asyncio tasks; neither imports gevent. The load client (``client.py``,
``counter-client``) lives in ``cli``, ``load`` and ``report``.
"""

from counter_server import one_name

one_name(__name__, "counter_server.client")  # before anything else

from counter_server.client.aio import AsyncCounterClient
from counter_server.client.errors import CounterError, Indeterminate, Refused, Unavailable
from counter_server.client.library import CounterClient

__all__ = [
    "AsyncCounterClient",
    "CounterClient",
    "CounterError",
    "Indeterminate",
    "Refused",
    "Unavailable",
]
