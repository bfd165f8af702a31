"""edge-kit: one trained model to a mixed fleet of edge devices, each on its best variant."""

__version__ = "0.1.0"
