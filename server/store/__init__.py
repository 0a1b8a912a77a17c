"""Where the shared counter lives: interchangeable stores behind one interface.

- ``base``: the interface, the arithmetic, and this process's memory (the Go
  original's behaviour).
- ``durable`` over ``statefile``: a crash-safe state file with a choice of fsync.
- ``shared``: one counter in shared memory for ``--processes`` workers.
- ``redis_backend``, ``etcd_backend`` (over ``batching``): one key shared by
  any number of instances (``urls`` parses ``--backend`` without loading
  their clients).

``server.wiring.open_store`` is the one place that picks and stacks them.
"""

from counter_server.server.errors import StoreUnavailable
from counter_server.server.store.base import (
    CounterStore,
    DeferringStore,
    Figure,
    LayeredStore,
    MemoryCounterStore,
    advance,
)

__all__ = [
    "CounterStore",
    "DeferringStore",
    "Figure",
    "LayeredStore",
    "MemoryCounterStore",
    "StoreUnavailable",
    "advance",
]
