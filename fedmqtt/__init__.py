"""fedmqtt: asynchronous federated learning for edge and IoT devices over MQTT.

The ``fedmqtt`` package is the shared core that both the device (``edge_agent``) and the
server (``aggregator``) import: the wire format, tensor codecs, authentication, the numpy model
zoo and the aggregation math. It imports only numpy and msgpack at top level so that the agent
stays light; everything heavier is imported where it is used.
"""

__version__ = "0.1.0"
