"""FedAsync: mix each arriving client model into the global model as soon as it arrives.

    Cong Xie, Sanmi Koyejo, Indranil Gupta. "Asynchronous Federated Optimization."
    arXiv:1903.03934 (2019).

The server update is ``w <- (1 - alpha_t) w + alpha_t x_new`` with ``alpha_t = alpha * s(tau)``,
where ``x_new`` is the client's locally trained model and ``s`` a staleness discount
(:mod:`fedmqtt.aggregation.staleness`). No buffering: suited to few devices reporting rarely,
at the price of one server step (and one global-model broadcast) per update.
"""

from __future__ import annotations

import numpy as np

from fedmqtt.aggregation._common import to_f32, unit_interval, vector
from fedmqtt.aggregation.staleness import Staleness
from fedmqtt.params import F32


def fedasync_alpha(alpha: float, staleness: Staleness, tau: int) -> float:
    """The mixing weight ``alpha * s(tau)`` of an update ``tau`` versions stale.

    ``alpha`` must be in [0, 1]; ``staleness(tau)`` must return a value in [0, 1] (all the
    functions of :mod:`~fedmqtt.aggregation.staleness` do), so the result is in [0, 1].
    A negative ``tau`` raises ValueError (from the staleness function).
    """
    a = unit_interval(alpha, "alpha")
    s = unit_interval(staleness(tau), f"staleness {staleness!r} at tau={tau}")
    return a * s


def fedasync_mix(w: F32, client_w: F32, alpha_t: float) -> F32:
    """``(1 - alpha_t) * w + alpha_t * client_w`` as a new float32 vector.

    Both vectors must be flat, of equal length and finite; ``alpha_t`` in [0, 1]. The mix is
    computed in float64 and rounded once, so ``alpha_t = 0`` returns exactly ``w`` and
    ``alpha_t = 1`` exactly ``client_w`` (as copies), and the result of a convex combination
    of finite values is finite.
    """
    w32 = vector(w, "w")
    c32 = vector(client_w, "client_w", w32.shape[0])
    a = unit_interval(alpha_t, "alpha_t")
    out = np.multiply(w32, 1.0 - a, dtype=np.float64)
    out += np.multiply(c32, a, dtype=np.float64)
    return to_f32(out, "fedasync_mix result")
