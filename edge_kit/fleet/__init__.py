"""The fleet: its inventory (``fleet.yaml``), commands over MQTT, and deploys over SSH."""
