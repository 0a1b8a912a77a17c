"""Where the shared counter lives: interchangeable stores behind one interface.

- ``memory``: this process's memory (the Go original's behaviour).
- ``durable`` over ``statefile``: a crash-safe state file with a choice of fsync.
- ``shared``: one counter in shared memory for ``--processes`` workers.
- ``redis_backend``: one Redis key shared by any number of instances
  (``redis_url`` parses ``--backend`` without loading redis-py).

``server.wiring.open_store`` is the one place that picks and stacks them.
"""

from counter_server.server.errors import StoreUnavailable
from counter_server.server.store.base import (
    CounterStore,
    DeferringStore,
    Figure,
    LayeredStore,
    advance,
)
from counter_server.server.store.memory import MemoryCounterStore

__all__ = [
    "CounterStore",
    "DeferringStore",
    "Figure",
    "LayeredStore",
    "MemoryCounterStore",
    "StoreUnavailable",
    "advance",
]
