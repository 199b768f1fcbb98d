"""The fedmqtt aggregator service (``fl-aggregator``): receives device updates over MQTT,
validates them, aggregates them into a global model, checkpoints it (at most every 0.1 s by
default under a fast stream) and publishes each checkpointed version signed and retained.
Start at :mod:`aggregator.service`; docs/aggregator.md explains the design, the configuration
and the delivery guarantee.

Importing this package pins OpenBLAS (numpy's BLAS) to one thread unless the environment says
otherwise. The service already runs its own threads, next to the broker; OpenBLAS's worker
threads spin while they wait for work, and on a busy 2-core host that made one (10 x 1e5)
matrix-vector product take 8 ms instead of 35 microseconds. It only takes effect if numpy was
not imported before (``fl-aggregator``, ``python -m aggregator`` and the worker processes);
an embedding process (the simulator) keeps its own BLAS settings.
"""

import os as _os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
