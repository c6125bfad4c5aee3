"""The accelerator catalogue: what each Cloud TPU type name means in hosts, chips and cores.

Type names count TensorCores for v2, v3, v4 and v5p (v3-32 = 32 cores = 4 hosts) and
chips for v5e (v5litepod) and v6e, following Google's naming.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from tpuctl.errors import TpuctlError


@dataclass(frozen=True)
class Generation:
    """One TPU generation and the rules its type names follow."""

    name: str  # the prefix in type names: v3, v5litepod, ...
    chips_per_host: int
    cores_per_chip: int
    sizes: tuple[int, ...]  # valid N in NAME-N
    size_counts: str  # "cores" or "chips": what N counts
    runtime_version: str  # default software image
    queued_for_pods: bool  # multi-host slices are provisioned through queued resources
    queued_for_spot: bool  # spot capacity of any size comes through queued resources
    # Slices of at most this many chips are one host, however many chips that is.
    single_host_max_chips: int = 0


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    return tuple(1 << k for k in range(low.bit_length() - 1, high.bit_length()))


_CORES = "cores"
_CHIPS = "chips"
_BASE_IMAGE = "tpu-ubuntu2204-base"

GENERATIONS: dict[str, Generation] = {
    g.name: g
    for g in (
        Generation("v2", 4, 2, (8, 32, 128, 256, 512), _CORES, _BASE_IMAGE, False, False),
        Generation("v3", 4, 2, (8, *_powers_of_two(32, 2048)), _CORES, _BASE_IMAGE, False, False),
        Generation(
            "v4", 4, 2, (*_powers_of_two(8, 1024), 1536, 2048, 3072, 4096), _CORES, _BASE_IMAGE,
            queued_for_pods=True, queued_for_spot=False,
        ),
        Generation(
            "v5litepod", 4, 1, (1, 4, 8, 16, 32, 64, 128, 256), _CHIPS, "v2-alpha-tpuv5-lite",
            queued_for_pods=True, queued_for_spot=True, single_host_max_chips=8,
        ),
        Generation(
            "v5p", 4, 2, (*_powers_of_two(8, 8192), 12288), _CORES, "v2-alpha-tpuv5",
            queued_for_pods=True, queued_for_spot=True,
        ),
        Generation(
            "v6e", 4, 1, (1, 4, 8, 16, 32, 64, 128, 256), _CHIPS, "v2-alpha-tpuv6e",
            queued_for_pods=True, queued_for_spot=True, single_host_max_chips=8,
        ),
    )
}  # fmt: skip
ALIASES = {"v5e": "v5litepod"}
_TYPE_RE = re.compile(r"^(?P<gen>v\d+[a-z]*)-(?P<size>\d+)$")


@dataclass(frozen=True)
class AcceleratorType:
    """A parsed type such as v3-32: its shape and provisioning defaults."""

    name: str  # canonical name (v5e-16 becomes v5litepod-16)
    generation: Generation
    size: int

    @property
    def chips(self) -> int:
        if self.generation.size_counts == "chips":
            return self.size
        return self.size // self.generation.cores_per_chip

    @property
    def hosts(self) -> int:
        """Number of workers (TPU VM hosts) in the slice."""
        if self.chips <= self.generation.single_host_max_chips:
            return 1
        return max(1, self.chips // self.generation.chips_per_host)

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def cores_per_host(self) -> int:
        return self.chips_per_host * self.generation.cores_per_chip

    @property
    def runtime_version(self) -> str:
        return self.generation.runtime_version

    def needs_queued(self, spot: bool = False) -> bool:
        """Whether Google provisions this slice through the queued-resources API."""
        gen = self.generation
        return (gen.queued_for_pods and self.hosts > 1) or (gen.queued_for_spot and spot)


def parse(type_name: str) -> AcceleratorType:
    """Parse a type name (case-insensitive; v5e-N is an alias of v5litepod-N).

    Raises a TpuctlError naming the nearest valid types for unknown or impossible names.
    """
    text = type_name.strip().lower()
    match = _TYPE_RE.match(text)
    if not match:
        raise TpuctlError(
            f"accelerator type {type_name!r} is not NAME-SIZE (e.g. v3-8, v4-32, v5litepod-16); "
            "see `tpuctl types`"
        )
    gen_name = ALIASES.get(match["gen"], match["gen"])
    size = int(match["size"])
    generation = GENERATIONS.get(gen_name)
    if generation is None:
        close = difflib.get_close_matches(gen_name, [*GENERATIONS, *ALIASES], n=3, cutoff=0.5)
        suggestions = [f"{g}-{size}" for g in close] or [f"{g}-8" for g in ("v3", "v4", "v5p")]
        raise TpuctlError(
            f"unknown TPU generation {match['gen']!r} in {type_name!r}; "
            f"did you mean {' or '.join(suggestions)}? (known: {', '.join(GENERATIONS)})"
        )
    if size not in generation.sizes:
        nearest = sorted(generation.sizes, key=lambda s: (abs(s - size), s))[:2]
        raise TpuctlError(
            f"{type_name!r} is not a {gen_name} slice size; nearest valid: "
            f"{' or '.join(f'{gen_name}-{s}' for s in sorted(nearest))}"
        )
    return AcceleratorType(f"{gen_name}-{size}", generation, size)


def all_types() -> list[AcceleratorType]:
    """Every type tpuctl knows, in generation then size order (for `tpuctl types`)."""
    return [AcceleratorType(f"{g.name}-{s}", g, s) for g in GENERATIONS.values() for s in g.sizes]
