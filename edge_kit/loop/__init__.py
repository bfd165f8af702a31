"""Orchestration: the only layer that combines fleet, history and selection (tune, rollouts, demo)."""
