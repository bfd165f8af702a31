"""The active model, served to applications on the device: a Unix-socket API and an in-process mode."""

from __future__ import annotations

from device_agents.serving.client import (
    Client,
    CurrentModel,
    ServingError,
    ServingRuntimeUnavailable,
    ServingStoreError,
    open_current,
)

__all__ = ["Client", "CurrentModel", "ServingError", "ServingRuntimeUnavailable", "ServingStoreError", "open_current"]
