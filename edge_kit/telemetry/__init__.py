"""Fleet telemetry on the host: the history store, the MQTT monitor and Prometheus metrics."""
