"""Differential privacy: the accountant wrapper (:mod:`.accountant`), the Gaussian mechanism
(:mod:`.mechanism`, :mod:`.clip`) and the ``[privacy]`` options (:mod:`.config`).

Pure and I/O-free like :mod:`fedmqtt.aggregation`; the aggregator keeps the per-device release
counts (``aggregator.privacy``) and the agent its own (local DP). docs/privacy.md states the
guarantee. Nothing is re-exported here, so a device importing :mod:`.clip` loads only numpy;
``dp-accounting`` is imported only when an ε is computed.
"""
