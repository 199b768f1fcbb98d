"""Operator tooling: PKI, broker credentials and ACL, device enrollment and revocation.

Run on the server that hosts the broker and the aggregator, as root (it writes files that
Mosquitto and the aggregator's service user must read). Entry point: ``fedmqtt-admin``
(:mod:`fedmqtt.admin.cli`). Modules here import ``cryptography`` lazily or only where needed.
"""
