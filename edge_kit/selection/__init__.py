"""Choosing each device's variant from what the devices measured, under each device's constraints."""
