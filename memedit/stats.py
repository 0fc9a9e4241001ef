"""Mergeable running statistics in float64 (count, sum, sum of squares per neuron)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-neuron first and second moments; `merge` of shards equals one pass over their union exactly
    up to float64 summation order."""

    count: torch.Tensor  # () float64
    total: torch.Tensor  # (n,) float64
    total_sq: torch.Tensor  # (n,) float64

    @classmethod
    def zeros(cls, n: int) -> Moments:
        z = torch.zeros(n, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), z, z.clone())

    def add(self, batch: torch.Tensor) -> None:
        """batch: (rows, n) of values."""
        b = batch.detach().to(torch.float64).cpu()
        self.count += b.shape[0]
        self.total += b.sum(0)
        self.total_sq += (b * b).sum(0)

    def merge(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation (n - 1), as torch.std and NeMo's hold-out statistics use."""
        n = self.count
        var = (self.total_sq - self.total * self.total / n) / (n - 1).clamp_min(1)
        return var.clamp_min(0).sqrt()

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}count": self.count.reshape(1), f"{prefix}sum": self.total, f"{prefix}sumsq": self.total_sq}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str) -> Moments:
        return cls(sd[f"{prefix}count"].reshape(()).clone(), sd[f"{prefix}sum"].clone(), sd[f"{prefix}sumsq"].clone())
