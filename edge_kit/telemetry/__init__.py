"""Fleet telemetry on the host: the history store, the MQTT monitor and Prometheus metrics."""

#: The default grace of the gap scan (``edgekit monitor --gap-grace-s``): how long (seconds) after a record (or a
#: telemetry claim) was stored the scan takes the numbers before it as settled, so a record of a lower ``seq`` still on
#: its way to another worker (queued behind that worker's batch, or in flight at the broker) is not taken as lost.
#: Here, not in :mod:`edge_kit.telemetry.store`, so the CLI reads it without importing the store at start-up.
GAP_GRACE_S = 30.0
