"""The federation simulator: a real broker, the real aggregator and N real agents on one machine.

Everything learning-quality the project claims is measured through here (``fedmqtt simulate``),
and the newcomer's demo (``fedmqtt demo``) is a default run of it.
"""
