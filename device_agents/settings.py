"""Benchmark settings: a plain dataclass, importable without numpy (the CLI and the config use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 10
    min_runs: int = 200
    min_seconds: float = 10.0
    max_runs: int = 100_000
    threads: int = 1
    delegate: str = "xnnpack"
    runtime: str | None = None  # None: the first installed of litert, tflite-runtime
