"""Reading the calibration statistics file (``stats.npz``) that :func:`graphkit.calibration.collect_stats`
writes: one array per activation (``[K, K]`` second moment, or its ``[K]`` diagonal for large K) plus
``__meta__`` (JSON: the [weight initializer, activation] map, token and sequence counts).

The reader lives beside the passes that use it (matmul-nbits, tied-embedding) rather than in
``graphkit.calibration``, which runs a pass's planning to find the MatMuls: passes import only graphkit's core.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from graphkit.errors import GraphkitError

META_KEY = "__meta__"  # the npz entry holding the JSON metadata (both sides of the format use this name)


class Stats:
    """Reads a stats file written by :func:`graphkit.calibration.collect_stats`: ``hessian(weight)`` /
    ``importance(weight)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.exists():
            raise GraphkitError(f"{path}: calibration statistics not found (written by graphkit convert --calibration)")
        try:
            self._z = np.load(path)
            meta = json.loads(bytes(self._z[META_KEY]).decode())
        except Exception as exc:
            raise GraphkitError(f"{path}: not a calibration statistics file ({type(exc).__name__}); "
                                "re-run graphkit convert --calibration") from None
        self.map = dict(meta["map"])
        self.tokens = meta["tokens"]
        self._cache: dict[str, np.ndarray] = {}

    def activation(self, weight: str, activation: str | None = None) -> str | None:
        """The activation whose statistics ``weight`` uses (MatMuls reading the same input share them)."""
        act = self.map.get(weight)
        if act is None or act not in self._z.files:
            act = activation  # a weight made by an earlier pass (pack-matmul): the activation it reads
        return act if act is not None and act in self._z.files else None

    def _get(self, weight: str, activation: str | None = None) -> np.ndarray | None:
        act = self.activation(weight, activation)
        if act is None:
            return None
        if act not in self._cache:
            self._cache = {act: self._z[act]}  # keep one: q/k/v (gate/up) read the same activation in a row
        return self._cache[act]

    def hessian(self, weight: str, activation: str | None = None) -> np.ndarray | None:
        a = self._get(weight, activation)
        return a if a is not None and a.ndim == 2 else None

    def importance(self, weight: str, activation: str | None = None) -> np.ndarray | None:
        a = self._get(weight, activation)
        if a is None:
            return None
        return np.diag(a).copy() if a.ndim == 2 else a
