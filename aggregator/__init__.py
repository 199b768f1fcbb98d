"""The fedmqtt aggregator service (``fl-aggregator``): receives device updates over MQTT,
validates them, aggregates them into a global model, checkpoints every version and publishes it
signed and retained. Start at :mod:`aggregator.service`; docs/aggregator.md explains the design,
the configuration and the delivery guarantee.
"""
