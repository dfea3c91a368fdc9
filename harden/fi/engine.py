"""The campaign engine: cached prefix runs, batched suffix runs, one fault per batch element.

Plan. Injection g of a site uses kept image g mod n (so every image is used
equally). Images are cached in blocks of `cache_images`; the injections of a
site whose image lies in a block are taken in order (round by round over the
block's images) and cut into shards of `batch`, so almost every suffix run is
full. The plan and every shard's faults follow from the config and seed alone,
so the file is reproducible and resumable.

Run. For each block, the full model runs once with every tensor that any
suffix needs exposed (at most at level 'extended': layout changes only slow
the exposed copies down). Each shard then corrupts one element per batch row
(or perturbs the layer output for a weight fault) and runs only the suffix.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.bitflip import int8_scale
from harden.fi.config import CampaignConfig
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import Journal, JournalContents, num
from harden.fi.prepare import EvalSet, prepare_eval
from harden.fi.profile import clamp_to_range
from harden.fi.sites import Site, list_sites, select_sites
from harden.fi.stats import leveugle_sample_size
from harden.fi.suffix import Suffix
from harden.fi.summary import CampaignSummary, summarise_contents
from harden.fi.weights import NodeRerun, conv_delta, gemm_delta, matmul_delta
from harden.files import sha256_bytes, sha256_file
from harden.graph.onnx_io import load_model
from harden.graph.ort import expose, make_session
from harden.provenance import package_versions


# At these ORT levels the prefix and every suffix run the same kernels, so the prefix's scores are
# each site's golden bit for bit (tested). 'all' changes layouts (NCHWc) per graph, so there the
# golden of a site is its own suffix run with no fault.
SAME_KERNELS = ("disable", "basic", "extended")


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
    bits = 1 if config.fault.kind == "random" else len(config.fault.choices())
    return {s.name: leveugle_sample_size(s.elements * bits * images, config.margin, config.confidence) for s in sites}


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


def _as_rows(rows: slice | np.ndarray) -> np.ndarray:
    return np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)


class SiteRunner:
    """Everything needed to inject into one site: its suffix and, for weights, the layer's fast path."""

    def __init__(self, info: GraphInfo, site: Site, config: CampaignConfig, ranges: dict[str, float],
                 suffixes: dict[str, Suffix]) -> None:
        self.site, self.config = site, config
        self.fixed_batch = info.fixed_batch
        node = info.nodes[info.node_index[site.node]]
        self.node = node
        self.out = site.tensor if site.kind == "activation" else node.output[0]
        if self.out not in suffixes:
            suffixes[self.out] = Suffix(info, self.out, config.providers, config.opt_level)
        self.suffix = suffixes[self.out]
        self.needs = set(self.suffix.inputs)
        self.relu_only, self.add_other = _relu_masking(info, site)
        if self.add_other not in self.suffix.inputs:  # the skip operand must be fault-free and cached
            self.add_other = None
        if site.kind == "activation":
            self.peak = float(ranges.get(site.tensor, 0.0))
            self.scale = self.peak / 127.0 if self.peak > 0 else 1.0
            return
        if site.shared:
            raise HardenError(f"weight {site.tensor!r} is read by several layers; injecting into shared weights "
                              "is not supported")
        self.weight = info.constants[site.tensor].astype(np.float32)
        self.peak = float(np.max(np.abs(self.weight))) if self.weight.size else 0.0
        self.scale = int8_scale(self.weight)
        self.acts = [n for n in node.input if n and n not in info.constants]
        self.needs.update(self.acts)
        self.rerun: NodeRerun | None = None
        self.rerun_args = (info, node, site.input_index, config.providers)

    def golden_values(self, cache: dict[str, np.ndarray], rows: slice | np.ndarray, elems: np.ndarray) -> np.ndarray:
        """The fault-free values of the chosen elements (one per batch row)."""
        if self.site.kind == "activation":
            r = _as_rows(rows)
            return cache[self.site.tensor].reshape(len(cache[self.site.tensor]), -1)[r, elems].copy()
        return self.weight.reshape(-1)[elems].copy()

    def null_scores(self, cache: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Scores of the suffix with no fault, for levels whose kernels may differ between prefix and suffix."""
        parts = []
        step = 1 if self.fixed_batch else self.config.batch
        for start in range(0, n, step):
            rows = np.arange(start, min(n, start + step))
            elems = np.zeros(len(rows), dtype=np.int64)
            values = self.golden_values(cache, rows, elems)
            parts.append(self.scores(cache, rows, elems, values, values))
        return np.concatenate(parts)

    def masked(self, golden: np.ndarray, faulty: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
        """Faults whose effect provably vanishes: no change at all, or a Relu input that stays negative.

        With `other` (the skip operand of an Add that feeds only Relus), the Relu
        input is golden + other vs faulty + other, one IEEE float32 addition each,
        exactly as the Add node computes it.
        """
        g, f = golden.astype(np.float32), faulty.astype(np.float32)
        same = g.view(np.uint32) == f.view(np.uint32)
        if self.relu_only:
            same |= (g < 0) & (f < 0)
        elif other is not None:
            with np.errstate(all="ignore"):
                same |= ((g + other) < 0) & ((f + other) < 0)
        return same

    def inject(self, cache: dict[str, np.ndarray], rows: slice | np.ndarray, rng: np.random.Generator,
               golden_scores: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run one shard: draw its faults, corrupt, run the suffix; return faults and faulty scores."""
        r = _as_rows(rows)
        elems = rng.integers(0, self.site.elements, len(r))
        bits, uniforms = self.config.fault.draw(rng, len(r))
        golden = self.golden_values(cache, r, elems)
        faulty = self.config.fault.apply(golden, bits, uniforms, self.scale, self.peak)
        if self.config.clamp == "range":
            faulty = clamp_to_range(faulty, self.peak)
        scores = self.scores(cache, r, elems, golden, faulty, golden_scores)
        return {"elems": elems, "bits": bits, "golden": golden, "faulty": faulty, "scores": scores}

    def scores(self, cache: dict[str, np.ndarray], rows: slice | np.ndarray, elems: np.ndarray, golden: np.ndarray,
               faulty: np.ndarray, golden_scores: np.ndarray | None = None) -> np.ndarray:
        """Class scores with element elems[i] of the site set to faulty[i] in batch row i.

        Given the rows' golden scores, provably masked faults take them without a run.
        """
        r = _as_rows(rows)
        if golden_scores is not None:
            other = None
            if self.add_other is not None:
                other = cache[self.add_other].reshape(len(cache[self.add_other]), -1)[r, elems]
            skip = self.masked(golden, faulty, other)
            if skip.any():
                out = np.array(golden_scores, copy=True)
                live = ~skip
                if live.any():
                    out[live] = self.scores(cache, r[live], elems[live], golden[live], faulty[live])
                return out
        # contiguous rows (the usual case) are fed as views; only the corrupted tensor is copied
        pick: slice | np.ndarray = slice(int(r[0]), int(r[-1]) + 1) if len(r) and r[-1] - r[0] == len(r) - 1 else r
        feeds = {k: cache[k][pick] for k in self.suffix.inputs}
        if self.site.kind == "activation":
            t = np.array(feeds[self.site.tensor], copy=True)
            t.reshape(len(r), -1)[np.arange(len(r)), elems] = faulty
            feeds[self.site.tensor] = t
        else:
            feeds[self.out] = self._weight_output(cache, r, elems, golden, faulty)
        return self.suffix.run(feeds)

    def _weight_output(self, cache: dict[str, np.ndarray], rows: np.ndarray, elems: np.ndarray, golden: np.ndarray,
                       faulty: np.ndarray) -> np.ndarray:
        """The layer output under each row's weight fault (fast path, or the node recomputed)."""
        y = np.ascontiguousarray(cache[self.out][rows])  # fancy indexing already copied
        with np.errstate(all="ignore"):
            delta = faulty.astype(np.float32) - golden.astype(np.float32)
            op, idx = self.node.op_type, self.site.input_index
            x = cache[self.acts[0]][rows] if self.acts else None
            done = False
            if op == "Conv" and x is not None:
                conv_delta(self.node, idx, self.weight, elems, delta, x, y)
                done = True
            elif op == "Gemm" and x is not None:
                done = gemm_delta(self.node, idx, self.weight, elems, delta, x, y)
            elif op == "MatMul" and x is not None:
                done = matmul_delta(idx, self.weight, elems, delta, x, y)
        if not done:
            if self.rerun is None:
                self.rerun = NodeRerun(*self.rerun_args)
            self.rerun.apply(self.site.tensor, self.weight, elems, faulty, {a: cache[a][rows] for a in self.acts}, y)
        return y


def _relu_masking(info: GraphInfo, site: Site) -> tuple[bool, str | None]:
    """(site feeds only Relus, skip operand of an Add that feeds only Relus): where masking is exact."""
    if site.kind != "activation":
        return False, None
    outputs = {o.name for o in info.model.graph.output}
    readers = [info.nodes[i] for i in info.consumers.get(site.tensor, [])]
    if not readers or site.tensor in outputs:
        return False, None
    if all(n.op_type == "Relu" for n in readers):
        return True, None
    if len(readers) != 1 or readers[0].op_type != "Add" or list(readers[0].input).count(site.tensor) != 1:
        return False, None
    add = readers[0]
    other = next(t for t in add.input if t != site.tensor)
    after = [info.nodes[i].op_type for i in info.consumers.get(add.output[0], [])]
    if (other not in info.tensors or not info.tensors[other].batched or add.output[0] in outputs
            or info.tensors[other].shape != info.tensors[site.tensor].shape or not after
            or set(after) != {"Relu"} or info.tensors[other].dtype != np.float32):
        return False, None
    return False, other


def prefix_level(level: str) -> str:
    """The level of the cached prefix run: layout changes ('all') only slow exposed tensors down."""
    return "extended" if level == "all" else level


def prefix_cache(info: GraphInfo, runners: Sequence[SiteRunner], x: np.ndarray,
                 config: CampaignConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One fault-free run of `x` caching every tensor the runners' suffixes read; also the golden scores."""
    names = sorted(set().union(*(r.needs for r in runners)) - {info.input_name})
    session = make_session(expose(info.model, names), config.providers, opt_level=prefix_level(config.opt_level))
    values = session.run([info.scores, *names], {info.input_name: x})
    cache = dict(zip(names, values[1:]))
    cache[info.input_name] = x
    return cache, values[0]


def outcome(scores: np.ndarray, golden_class: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(faulty class, non-finite flag, |Δloss| against the golden class's cross-entropy) per row.

    NaN scores never win the argmax; a row of NaN has class −1 (always an SDC).
    """
    with np.errstate(all="ignore"):
        s = scores.astype(np.float64)
    nonfinite = ~np.isfinite(s).all(axis=1)
    masked = np.where(np.isnan(s), -np.inf, s)
    cls = np.argmax(masked, axis=1)
    cls[np.isnan(s).all(axis=1)] = -1
    with np.errstate(all="ignore"):
        top = masked.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(s - top).sum(axis=1))
        loss = lse - s[np.arange(len(s)), golden_class]
    return cls, nonfinite, loss


def _model_and_hash(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, sha256_bytes(model.SerializeToString())
    return load_model(model), sha256_file(model)


def run_campaign(model: str | os.PathLike[str] | onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray,
                 config: CampaignConfig, out_jsonl: str | os.PathLike[str], progress: bool = True,
                 profile_inputs: np.ndarray | None = None, fresh: bool = False) -> CampaignSummary:
    """Run (or resume) a campaign on model-ready `inputs` and stream it to `out_jsonl`; return its summary."""
    proto, digest = _model_and_hash(model)
    info = GraphInfo(proto, example=inputs[:1], providers=config.providers)
    sites = select_sites(list_sites(info, config.all_tensors), config.layers, config.kinds)
    act = [s.tensor for s in sites if s.kind == "activation"]
    ev = prepare_eval(info.model, inputs, labels, act, profile_inputs, config.batch, config.providers,
                      config.opt_level)
    if info.fixed_batch not in (None, 1):
        raise HardenError(f"the model input has a fixed batch of {info.fixed_batch}; export it with a dynamic "
                          "(or unit) batch dimension")
    batch = info.fixed_batch or config.batch
    block_images = info.fixed_batch or max(batch, config.cache_images)
    counts = injections_per_site(sites, config, len(ev.ids))
    plan = plan_shards(sites, counts, len(ev.ids), batch, block_images)
    header: dict[str, Any] = {"type": "header", "version": 1, "model_sha256": digest, "config": config.to_dict(),
                              "sites": [s.to_dict() for s in sites], "injections": counts,
                              "total_shards": len(plan), "eval": ev.header(), "packages": package_versions()}
    journal = Journal(out_jsonl, header, fresh=fresh)
    todo = [s for s in plan if s.index not in journal.done
            and (config.shard is None or s.index % config.shard[1] == config.shard[0])]
    started = time.perf_counter()
    try:
        _execute(info, sites, ev, config, todo, journal, block_images, progress)
    finally:
        journal.close()
    seconds = time.perf_counter() - started
    summary = summarise_contents(JournalContents(out_jsonl))
    done = sum(s.count for s in todo)
    summary.seconds = seconds
    summary.injections_per_s = done / seconds if done and seconds > 0 else None
    return summary


def _execute(info: GraphInfo, sites: Sequence[Site], ev: EvalSet, config: CampaignConfig, todo: Sequence[Shard],
             journal: Journal, block_images: int, progress: bool) -> None:
    """Run the pending shards block by block, appending each to the journal as it completes."""
    if not todo:
        return
    from tqdm import tqdm

    by_name = {s.name: s for s in sites}
    suffixes: dict[str, Suffix] = {}
    runners = {name: SiteRunner(info, by_name[name], config, ev.ranges, suffixes)
               for name in dict.fromkeys(s.site for s in todo)}
    exposed = sorted(set().union(*(r.needs for r in runners.values())) - {info.input_name})
    prefix = make_session(expose(info.model, exposed), config.providers, opt_level=prefix_level(config.opt_level))
    bar = tqdm(total=sum(s.count for s in todo), unit="inj", disable=not progress, file=sys.stderr,
               desc="inject", dynamic_ncols=True)
    try:
        for block in sorted({s.block for s in todo}):
            shards = [s for s in todo if s.block == block]
            lo, hi = block_bounds(block, len(ev.ids), block_images)
            names = sorted(set().union(*(runners[s.site].needs for s in shards)) - {info.input_name})
            x = ev.inputs[lo:hi]
            scores: list[np.ndarray] = []
            parts: list[list[np.ndarray]] = [[] for _ in names]
            step = info.fixed_batch or config.batch
            for start in range(0, hi - lo, step):
                values = prefix.run([info.scores, *names], {info.input_name: x[start:start + step]})
                scores.append(values[0])
                for acc, v in zip(parts, values[1:]):
                    acc.append(v)
            cache = {name: np.concatenate(acc) for name, acc in zip(names, parts)}
            cache[info.input_name] = x
            prefix_scores = np.concatenate(scores)
            goldens: dict[str, np.ndarray] = {}
            for shard in shards:
                rows = shard_rows(shard, hi - lo)
                runner = runners[shard.site]
                if config.opt_level not in SAME_KERNELS and shard.site not in goldens:
                    goldens[shard.site] = runner.null_scores(cache, hi - lo)
                golden_scores = goldens.get(shard.site, prefix_scores)[rows]
                res = runner.inject(cache, rows, shard_rng(config.seed, shard.site, shard), golden_scores)
                records = _records(shard, runner.site, res, golden_scores, ev.ids[lo + rows])
                journal.append(shard.index, shard.site, records)
                bar.update(shard.count)
    finally:
        bar.close()


def _records(shard: Shard, site: Site, res: dict[str, np.ndarray], golden_scores: np.ndarray,
             ids: np.ndarray) -> list[dict[str, Any]]:
    golden_class = np.argmax(golden_scores, axis=1)
    cls, nonfinite, loss = outcome(res["scores"], golden_class)
    with np.errstate(invalid="ignore"):
        dloss = np.abs(loss - outcome(golden_scores, golden_class)[2])
    out = []
    for i in range(shard.count):
        out.append({"type": "fault", "shard": shard.index, "site": site.name, "kind": site.kind,
                    "image": int(ids[i]), "element": int(res["elems"][i]), "bits": [int(b) for b in res["bits"][i]],
                    "golden": num(res["golden"][i]), "faulty": num(res["faulty"][i]),
                    "golden_class": int(golden_class[i]), "faulty_class": int(cls[i]),
                    "sdc": bool(cls[i] != golden_class[i]), "nonfinite": bool(nonfinite[i]),
                    "dloss": num(dloss[i])})
    return out


def write_summary(summary: CampaignSummary, path: str | os.PathLike[str]) -> None:
    """Write the summary JSON atomically."""
    from harden.files import write_json

    write_json(Path(path), summary.to_dict())
