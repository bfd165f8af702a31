"""The on-device side of edge-kit. Needs only numpy, a LiteRT interpreter and (for the service) paho-mqtt.

Nothing in this package imports TensorFlow or the host package's heavy modules.
"""

__version__ = "0.1.0"
