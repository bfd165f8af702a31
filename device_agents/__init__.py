"""The on-device side of edge-kit. Needs only numpy, a LiteRT interpreter and (for the service) paho-mqtt.

Imports nothing of edge-kit but the protocol package (:mod:`edgekit_protocol`), and never TensorFlow.
"""
