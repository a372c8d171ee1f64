"""Data-parallel shards: which process does which part of the work.

A :class:`Shard` is ``index/count`` (0-based). :func:`split` deals work units to ``count`` shards,
deterministically, disjoint and covering, balanced by cost; :func:`from_environment` reads the
shard of a process started by ``torchrun`` or ``accelerate launch`` (``RANK`` / ``WORLD_SIZE``,
else ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``). Plain Python: no torch, no process group.

Example::

    >>> shard = parse_shard("1/2")
    >>> split([64, 64, 256, 256], shard.count)
    [0, 1, 0, 1]
    >>> shard.select(["a", "b", "c", "d"], [64, 64, 256, 256])
    ['b', 'd']
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Shard", "from_environment", "parse_shard", "split"]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.index, self.count))
        if not (ints and 0 <= self.index < self.count):
            raise ValueError(f"a shard is i/n with integers 0 <= i < n, got {self.index!r}/{self.count!r}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, units: Sequence, costs: Sequence[float]) -> list:
        """The units of this shard (in their given order), as :func:`split` deals them."""
        owners = split(costs, self.count)
        if len(owners) != len(units):
            raise ValueError(f"{len(units)} units but {len(costs)} costs")
        return [u for u, s in zip(units, owners, strict=True) if s == self.index]


def parse_shard(text: str) -> Shard:
    """``"i/n"`` → :class:`Shard`; anything else raises ``ValueError``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None or not int(m[1]) < int(m[2]):
        raise ValueError(f"a shard is i/n with 0 <= i < n, got {text!r}")
    return Shard(int(m[1]), int(m[2]))


def split(costs: Sequence[float], count: int) -> list[int]:
    """The shard (``0 .. count-1``) of each work unit, balanced by cost.

    Longest first (ties: the earlier unit first), each unit goes to the shard with the least cost
    so far (ties: the lower shard). Deterministic; every unit gets exactly one shard. The loads
    differ by at most the largest cost; with equal costs this is round robin (counts differ by at
    most one).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the shard count must be an integer >= 1, got {count!r}")
    costs = [float(c) for c in costs]
    if any(not c >= 0 for c in costs):
        raise ValueError("work-unit costs must be numbers >= 0")
    load = [0.0] * count
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        s = min(range(count), key=lambda s: (load[s], s))
        owner[i] = s
        load[s] += costs[i]
    return owner


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    if not re.fullmatch(r"\s*\d+\s*", value):
        raise ValueError(f"environment variable {name}={value!r} is not a non-negative integer")
    return int(value)


def from_environment(environ: Mapping[str, str]) -> Shard | None:
    """The shard of a process started by ``torchrun`` / ``accelerate launch``, or ``None``.

    ``RANK`` of ``WORLD_SIZE`` when ``WORLD_SIZE`` is set (``RANK`` missing: ``LOCAL_RANK``);
    else ``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``. ``None`` when no world size is set or it is 1.
    """
    world = _env_int(environ, "WORLD_SIZE")
    if world is not None:
        rank, names = _env_int(environ, "RANK"), "RANK/WORLD_SIZE"
        if rank is None:
            rank, names = _env_int(environ, "LOCAL_RANK"), "LOCAL_RANK/WORLD_SIZE"
    else:
        world = _env_int(environ, "LOCAL_WORLD_SIZE")
        rank, names = _env_int(environ, "LOCAL_RANK"), "LOCAL_RANK/LOCAL_WORLD_SIZE"
    if world is None or world <= 1:
        return None
    if rank is None:
        size = names.split("/")[1]
        raise ValueError(f"environment: {size}={world} but neither RANK nor LOCAL_RANK is set")
    if not rank < world:
        raise ValueError(f"environment: {names} = {rank}/{world} is not a shard (needs rank < world size)")
    return Shard(rank, world)
