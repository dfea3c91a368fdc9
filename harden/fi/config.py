"""The resolved configuration of a campaign, recorded in the JSONL header and the summary.

Everything that changes which faults are drawn or how they are evaluated lives
here, so two files with the same config, model and data are the same campaign.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from harden.errors import HardenError
from harden.fi.faults import FaultModel
from harden.graph.ort import OPT_LEVELS

ENGINES = ("cone", "suffix")


@dataclass(frozen=True)
class CampaignConfig:
    """How to run a campaign.

    `injections` is N per site unless `margin` is set, in which case N comes
    from Leveugle et al.'s formula for that error margin. `batch` is the
    number of faults per suffix run (and images per prefix run); up to
    `cache_images` images have their crossing tensors cached at a time, fewer
    when those tensors would take more than `cache_mb` MiB. `shard` is
    (i, n): run only shards whose index ≡ i (mod n); None runs all.
    `engine` says how a fault is propagated: 'cone' recomputes, node by node,
    only what it can reach (harden.fi.cone): an activation fault's windows, a
    weight fault's faulty layer output onwards; 'suffix' reruns the whole
    downstream graph at `opt_level` (harden.fi.suffix).
    """

    layers: str = "all"
    kinds: tuple[str, ...] = ("activation", "weight")
    injections: int = 1000
    margin: float | None = None
    fault: FaultModel = field(default_factory=FaultModel)
    clamp: str = "none"
    seed: int = 0
    batch: int = 64
    cache_images: int = 512
    cache_mb: float = 1024.0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    opt_level: str = "disable"
    confidence: float = 0.95
    ci: str = "wilson"
    all_tensors: bool = False
    shard: tuple[int, int] | None = None
    engine: str = "cone"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise HardenError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.clamp not in ("none", "range"):
            raise HardenError(f"--clamp must be none or range, got {self.clamp!r}")
        if self.injections < 1:
            raise HardenError(f"injections per layer must be positive, got {self.injections}")
        if self.batch < 1 or self.cache_images < 1 or self.cache_mb <= 0:
            raise HardenError(f"batch and cache_images must be positive, got {self.batch}, {self.cache_images}")
        if self.opt_level not in OPT_LEVELS:
            raise HardenError(f"unknown graph optimisation level {self.opt_level!r}; use one of {sorted(OPT_LEVELS)}")
        if self.ci not in ("wilson", "clopper-pearson"):
            raise HardenError(f"--ci must be wilson or clopper-pearson, got {self.ci!r}")
        if not 0 < self.confidence < 1:
            raise HardenError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.margin is not None and not 0 < self.margin < 1:
            raise HardenError(f"--margin must be in (0, 1), got {self.margin}")
        if self.shard is not None and not (self.shard[1] >= 1 and 0 <= self.shard[0] < self.shard[1]):
            raise HardenError(f"--shard must be i/n with 0 <= i < n, got {self.shard[0]}/{self.shard[1]}")

    def without_shard(self) -> CampaignConfig:
        return replace(self, shard=None)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["fault"] = self.fault.to_dict()
        d["kinds"] = list(self.kinds)
        d["providers"] = list(self.providers)
        d["shard"] = None if self.shard is None else list(self.shard)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CampaignConfig:
        d = dict(data)
        d["fault"] = FaultModel.from_dict(d["fault"])  # type: ignore[arg-type]
        d["kinds"] = tuple(d["kinds"])  # type: ignore[arg-type]
        d["providers"] = tuple(d["providers"])  # type: ignore[arg-type]
        d["shard"] = None if d.get("shard") is None else tuple(d["shard"])  # type: ignore[arg-type]
        d.setdefault("engine", "suffix")  # files written before the cone engine existed
        return cls(**d)  # type: ignore[arg-type]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' to (i, n)."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(i), int(n)
    except ValueError as err:
        raise HardenError(f"--shard must look like 0/4, got {text!r}") from err
