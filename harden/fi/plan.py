"""The campaign plan: which injections exist, how they are cut into shards, and each shard's seed.

Injection g of a site uses kept image g mod n (so every image is used
equally). Images are cached in blocks of `cache_images`; the injections of a
site whose image lies in a block are taken in order (round by round over the
block's images) and cut into shards of `batch`, so almost every suffix run is
full. The plan and every shard's faults follow from the config and seed alone,
so a file is reproducible, resumable and splittable with `--shard i/n`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harden.fi.config import CampaignConfig
from harden.fi.faults import site_fault
from harden.fi.sites import Site
from harden.fi.stats import leveugle_sample_size


@dataclass(frozen=True)
class Shard:
    """`count` injections into `site`: positions offset..offset+count−1 of the site's injections in `block`."""

    index: int
    site: str
    block: int
    chunk: int
    offset: int
    count: int


def injections_per_site(sites: Sequence[Site], config: CampaignConfig, images: int) -> dict[str, int]:
    """N per site: fixed, or Leveugle's sample size for the fault population elements × bits × images."""
    if config.margin is None:
        return {s.name: config.injections for s in sites}
    def bits(site: Site) -> int:
        return 1 if config.fault.kind == "random" else len(site_fault(config.fault, site).choices())

    return {s.name: leveugle_sample_size(s.elements * bits(s) * images, config.margin, config.confidence)
            for s in sites}


def block_bounds(block: int, images: int, block_images: int) -> tuple[int, int]:
    """Kept-image positions [lo, hi) of a cache block."""
    return block * block_images, min(images, (block + 1) * block_images)


def plan_shards(sites: Sequence[Site], counts: dict[str, int], images: int, batch: int,
                block_images: int) -> list[Shard]:
    """The campaign's shards in canonical (= execution and file) order."""
    shards: list[Shard] = []
    for block in range(math.ceil(images / block_images)):
        lo, hi = block_bounds(block, images, block_images)
        for site in sites:
            n = counts[site.name]
            here = sum(max(0, min(hi, n - r * images) - lo) for r in range(math.ceil(n / images)))
            for chunk in range(math.ceil(here / batch)):
                shards.append(Shard(len(shards), site.name, block, chunk, chunk * batch,
                                    min(batch, here - chunk * batch)))
    return shards


def shard_rows(shard: Shard, width: int) -> np.ndarray:
    """Rows of the block cache (images) that the shard's injections use; rounds wrap over the block's `width` images."""
    return (shard.offset + np.arange(shard.count)) % width


def shard_rng(seed: int, site: str, shard: Shard) -> np.random.Generator:
    """The generator of one shard's faults, independent of which other shards or sites run."""
    key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, key, shard.block, shard.chunk])
