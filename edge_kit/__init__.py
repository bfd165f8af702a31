"""edge-kit: one trained model to a mixed fleet of edge devices, each on its best variant.

The host side: compiler, target plugins' compile steps, fleet, history, selection, orchestration
and the ``edgekit`` CLI. See the docs' architecture page for the layers.
"""

from edgekit_protocol import __version__

__all__ = ["__version__"]
