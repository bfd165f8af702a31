"""Choosing each device's variant from what the devices measured, under each device's constraints."""

#: The default ``--margin`` of select and tune (the relative gain needed to switch from the current variant): here, not in
#: :mod:`edge_kit.selection.policy`, so the CLI reads it without importing numpy and the profile models at start-up.
DEFAULT_MARGIN = 0.1
