"""What pruned positions are filled with: zeros (what NeMo and the subspace method do) or seeded noise.

Zeroed rows stand out in a released checkpoint, and a found position can be refilled by fine-tuning
it alone (the robustness issue). `noise` writes N(0, sigma^2) instead, sigma the standard deviation
of the tensor's elements that no edit touches, drawn from a generator seeded by (seed, tensor key).
The values are a pure function of the input tensor, the recipe and the seed, so `verify` and `diff`
recompute them exactly (they read sigma from the untouched elements, which the edit leaves as
they were).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

FILLS = ("zeros", "noise")


@dataclass(frozen=True)
class Fill:
    mode: str = "zeros"  # zeros | noise
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> Fill:
        d = d or {}
        return cls(str(d.get("mode", "zeros")), int(d.get("seed", 0)))


ZEROS = Fill()


def to_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements (see bits_view) as float64 values."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).astype(np.float64)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as raw elements of `dtype`, rounded to nearest even (finite values)."""
    if dtype == "BF16":
        u = values.astype(np.float32).view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    kind = {"F16": (np.float16, np.uint16), "F32": (np.float32, np.uint32), "F64": (np.float64, np.uint64)}[dtype]
    return values.astype(kind[0]).view(kind[1])


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def fill_values(
    bits: np.ndarray, dtype: str, positions: np.ndarray, untouched: np.ndarray, key: str, fill: Fill
) -> tuple[np.ndarray, float]:
    """(raw elements for the True entries of `positions`, in C order; sigma). `bits` holds the
    tensor's elements, of which those in `untouched` are the input's own."""
    count = int(positions.sum())
    if fill.mode == "zeros":
        return np.zeros(count, dtype=bits.dtype), 0.0
    ref = to_float(bits[untouched], dtype) if untouched.any() else to_float(bits, dtype)
    sigma = float(ref.std()) if ref.size else 0.0
    return from_float(_rng(fill.seed, key).standard_normal(count) * sigma, dtype), sigma


def edit_positions(shape: tuple[int, ...], ops: list[tuple[str, tuple[int, ...], np.ndarray | None]]):
    """(zeroed, touched) boolean arrays of a tensor's shape for its edits (op, indices, mask):
    zeroed = the positions zero_rows / zero_cols / mask prune, touched = those and the scaled rows."""
    zeroed = np.zeros(shape, dtype=bool)
    scaled = np.zeros(shape, dtype=bool)
    for op, indices, mask in ops:
        if op == "zero_rows":
            zeroed[list(indices)] = True
        elif op == "zero_cols":
            zeroed[:, list(indices)] = True
        elif op == "mask" and mask is not None:
            zeroed |= mask.astype(bool)
        elif op == "scale":
            scaled[list(indices)] = True
    return zeroed, zeroed | scaled


def recipe_ops(edits, masks: dict) -> list[tuple[str, tuple[int, ...], np.ndarray | None]]:
    """edit_positions' (op, indices, mask) for recipe edits, masks from the recipe's sidecar."""
    return [(e.op, e.indices, masks.get(e.mask_key) if e.op == "mask" else None) for e in edits]
