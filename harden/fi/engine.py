"""The campaign engine: cached prefix runs, batched suffix runs, one fault per batch element.

For each block of images (harden.fi.plan), the full model runs once with every
tensor that any suffix needs exposed (at most at level 'extended': layout
changes only slow the exposed copies down). Each shard then corrupts one
element per batch row, or perturbs the layer output for a weight fault
(harden.fi.runner), runs only the suffix and streams its records to the
journal (harden.fi.journal).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.cone import SLIDING, Cone, GoldenBlock
from harden.fi.config import CampaignConfig
from harden.fi.faults import check_clamp, resolve_format
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import Journal, JournalContents, num
from harden.fi.nodes import NODE_LEVEL, NodeSessions, golden_pass
from harden.fi.outcome import nonfinite_rows, top1_class
from harden.fi.plan import Shard, block_bounds, injections_per_site, plan_shards, shard_rng, shard_rows
from harden.fi.prepare import EvalSet, check_labels, prepare_eval, prepare_eval_nodes
from harden.fi.runner import SAME_KERNELS, SiteRunner, golden_needs, prefix_level, walks_cone
from harden.fi.sites import Site, layer_node, list_sites, select_sites
from harden.fi.suffix import Suffix
from harden.fi.whole_model import WholeModel, needs_whole_model
from harden.fi.summary import CampaignSummary, summarise_contents
from harden.files import sha256_bytes, sha256_file
from harden.graph.onnx_io import load_model
from harden.graph.ort import SharedWeights, expose, make_session
from harden.graph.parallel import concurrent_runs
from harden.provenance import package_versions


def outcome(scores: np.ndarray, golden_class: np.ndarray,
            probabilities: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, non-finite flag, cross-entropy loss of the golden class) per row.

    Class and flag follow `harden.fi.outcome` (the rule the exact analysis shares).
    Probability outputs (an exported Softmax) give the loss −log p directly.
    """
    with np.errstate(all="ignore"):
        s = scores.astype(np.float64)
    cls, nonfinite = top1_class(s), nonfinite_rows(s)
    with np.errstate(all="ignore"):
        top = np.where(np.isnan(s), -np.inf, s).max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(s - top).sum(axis=1))
        picked = s[np.arange(len(s)), golden_class]
        loss = -np.log(picked) if probabilities else lse - picked
    return cls, nonfinite, loss


def _model_and_hash(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, sha256_bytes(model.SerializeToString())
    return load_model(model), sha256_file(model)


def cache_block_images(info: GraphInfo, sites: Sequence[Site], config: CampaignConfig) -> int:
    """Images per cache block: `cache_images`, fewer when their cached tensors would exceed `cache_mb`.

    Fixed by the model and config alone, so the plan (and file) stays
    reproducible. Both engines' needs count whichever engine runs, so that
    switching engines keeps the plan, and with it every drawn fault.
    """
    names: set[str] = set()
    # Until 2026-11-27 the cone kept a padded copy of every Conv and pooling input. Those copies still count
    # here, so that campaign files written before keep their plan and resume.
    padded: set[str] = set()
    for site in sites:
        if site.kind == "activation":
            cone = Cone(info, None, site.tensor)
            names.update(cone.needs())
            padded.update(info.nodes[i].input[0] for i in cone.order if info.nodes[i].op_type in SLIDING)
        node = layer_node(info, site)
        names.update(info.cut(site.tensor if site.kind == "activation" else node.output[0]))
        if site.kind == "weight":
            names.update(t for t in node.input if t and t not in info.constants)
    per_image = sum(int(np.prod(info.tensors[n].shape[1:], dtype=np.int64)) * info.tensors[n].dtype.itemsize
                    for group in (names, padded) for n in group)
    fit = int(config.cache_mb * 2**20 // max(per_image, 1))
    return max(1, min(config.cache_images, fit))


def run_campaign(model: str | os.PathLike[str] | onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray,
                 config: CampaignConfig, out_jsonl: str | os.PathLike[str], progress: bool = True,
                 profile_inputs: np.ndarray | None = None, fresh: bool = False, threads: int = 0) -> CampaignSummary:
    """Run (or resume) a campaign on model-ready `inputs` and stream it to `out_jsonl`; return its summary.

    `threads` is how many CPU threads it uses (0: every CPU): that many fault
    runs at once (`concurrent_runs`), and the intra-op threads of the golden
    and evaluation passes. It changes speed only, never a result, so it is not
    part of the config.
    """
    proto, digest = _model_and_hash(model)
    info = GraphInfo(proto, example=inputs[:1], providers=config.providers)
    sites = select_sites(list_sites(info, config.all_tensors), config.layers, config.kinds)
    config = replace(config, fault=resolve_format(config.fault, sites))
    check_clamp(config.clamp, sites)
    dtype = info.tensors[info.input_name].dtype  # a float16 graph takes float16 images
    inputs = inputs.astype(dtype, copy=False)
    profile_inputs = None if profile_inputs is None else profile_inputs.astype(dtype, copy=False)
    act = [s.tensor for s in sites if s.kind == "activation"]
    check_labels(labels, info.classes)
    if info.fixed_batch not in (None, 1):
        raise HardenError(f"the model input has a fixed batch of {info.fixed_batch}; export it with a dynamic "
                          "(or unit) batch dimension")
    batch = info.run_batch or config.batch
    block_images = info.run_batch or cache_block_images(info, sites, config)
    sessions = NodeSessions(info, config.providers, threads) if config.engine == "cone" else None
    workers = concurrent_runs(threads)
    walk_sessions = NodeSessions(info, config.providers, 1) if sessions is not None and workers > 1 else sessions
    first_block: dict[str, np.ndarray] | None = None
    coned = [s for s in sites if walks_cone(info, s)] if sessions is not None else []
    if coned and profile_inputs is None:
        # one node-by-node pass gives the golden scores, the ranges and the first block's tensors
        keep = set().union(*(golden_needs(info, s) for s in coned))
        ev, first_block = prepare_eval_nodes(sessions, inputs, labels, act, batch, keep, block_images, progress)
    else:
        # the cone engine's goldens come from level-'all' kernels, so its evaluation pass runs at 'all' too
        eval_level = NODE_LEVEL if coned else config.opt_level
        ev = prepare_eval(info.model, inputs, labels, act, profile_inputs, config.batch, config.providers,
                          eval_level, threads, int(config.cache_mb * 2**20))
    counts = injections_per_site(sites, config, len(ev.ids))
    plan = plan_shards(sites, counts, len(ev.ids), batch, block_images)
    header: dict[str, Any] = {"type": "header", "version": 1, "model_sha256": digest, "config": config.to_dict(),
                              "sites": [s.to_dict() for s in sites], "injections": counts,
                              "total_shards": len(plan), "eval": ev.header(), "packages": package_versions()}
    journal = Journal(out_jsonl, header, fresh=fresh)
    todo = [s for s in plan if s.index not in journal.done
            and (config.shard is None or s.index % config.shard[1] == config.shard[0])]
    held = {} if first_block is None else {0: GoldenBlock(first_block)}
    del first_block  # _execute lets block 0 go once it is done: the cache budget is one block
    started = time.perf_counter()
    try:
        _execute(info, sites, ev, config, todo, journal, block_images, progress, sessions, held, walk_sessions,
                 workers)
    finally:
        journal.close()
    seconds = time.perf_counter() - started
    summary = summarise_contents(JournalContents(out_jsonl))
    done = sum(s.count for s in todo)
    summary.seconds = seconds
    summary.injections_per_s = done / seconds if done and seconds > 0 else None
    return summary


def _execute(info: GraphInfo, sites: Sequence[Site], ev: EvalSet, config: CampaignConfig, todo: Sequence[Shard],
             journal: Journal, block_images: int, progress: bool, sessions: NodeSessions | None = None,
             held: dict[int, GoldenBlock] | None = None, walk_sessions: NodeSessions | None = None,
             workers: int = 1) -> None:
    """Run the pending shards block by block, appending each to the journal as it completes.

    `sessions` are the cone engine's node sessions for golden passes (None:
    suffix engine), `walk_sessions` those its walks use (default: the same),
    `workers` how many fault runs go at once, and `held` the golden
    tensors of block 0 when the evaluation pass kept them ({0: tensors},
    emptied as soon as block 0 starts). Their results are
    journaled in file order, so the file is the same whatever `workers`.
    """
    if not todo:
        return
    from tqdm import tqdm

    by_name = {s.name: s for s in sites}
    suffixes: dict[str, Suffix] = {}
    names = list(dict.fromkeys(s.site for s in todo))
    whole_sites = [by_name[n] for n in names if needs_whole_model(info, by_name[n])]
    whole = WholeModel(info, whole_sites, config.providers, config.opt_level, 1) if whole_sites else None
    # every session that recomputes a fault runs on one ORT thread, several at once (why: harden.graph.parallel;
    # on the 224 px bench, 2 walks at once made the injection phase 1.8-2.0x faster, 2 intra-op threads 1.6x).
    # Only the cone engine's golden passes keep intra-op threads: its blocked kernels (level 'all') gave the
    # same bits whatever the threads and batch.
    walked = {name for name in names if walks_cone(info, by_name[name])} if sessions is not None else set()
    # the suffix sessions read one copy of the weights (built only if some site runs its suffix)
    shared = SharedWeights({n: info.constants[n] for n in info.constants_initializers()}) \
        if set(names) - walked else None
    runners = {name: SiteRunner(info, by_name[name], config, ev.ranges, suffixes, 1,
                                (walk_sessions or sessions) if name in walked else None, whole, shared)
               for name in names}
    prefix = None
    if any(r.cone is None for r in runners.values()):  # only suffix runs read the prefix's cache
        exposed = sorted(set().union(*(r.needs for r in runners.values())) - {info.input_name})
        prefix = make_session(expose(info.model, exposed), config.providers,
                              opt_level=prefix_level(config.opt_level), threads=1, spinning=False)
    cone_keep = set().union(*(golden_needs(info, r.site) for r in runners.values() if r.cone is not None))
    bar = tqdm(total=sum(s.count for s in todo), unit="inj", disable=not progress, file=sys.stderr,
               desc="inject", dynamic_ncols=True)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="walk") if workers > 1 else None
    pending: deque[tuple[list[Shard], list[np.ndarray], list[np.ndarray], int, Future[list[dict[str, np.ndarray]]]]]
    pending = deque()

    def record(group: list[Shard], rows_of: list[np.ndarray], golden_of: list[np.ndarray], lo: int,
               results: list[dict[str, np.ndarray]]) -> None:
        """Append a group's shards to the journal."""
        for shard, rows, res, golden_scores in zip(group, rows_of, results, golden_of):
            journal.append(shard.index, shard.site, _records(shard, by_name[shard.site], res, golden_scores,
                                                             ev.ids[lo + rows], ev.probabilities))
            bar.update(shard.count)

    def settle(limit: int) -> None:
        """Journal the oldest concurrent runs, in file order, until at most `limit` are pending."""
        while len(pending) > limit:
            group, rows_of, golden_of, lo, future = pending.popleft()
            record(group, rows_of, golden_of, lo, future.result())

    held = {} if held is None else held

    def run_block(block: int) -> None:
        """Run one block's shards. Its tensors are this function's locals, so they are gone before the next
        block's are made: the cache_mb budget holds one block, not two."""
        shards = [s for s in todo if s.block == block]
        lo, hi = block_bounds(block, len(ev.ids), block_images)
        x = ev.inputs[lo:hi]
        step = info.run_batch or config.batch
        if prefix is not None and any(runners[s.site].cone is None for s in shards):
            cache, prefix_scores = _prefix_block(info, prefix, x, step,
                                                 set().union(*(runners[s.site].needs for s in shards)), pool)
        if sessions is not None and any(runners[s.site].cone is not None for s in shards):
            ready = held.pop(block, None)
            held.clear()  # block 0's tensors, where a resumed campaign has done it already
            # one chunk: the block's tensors need no concatenation
            golden_block = ready if ready is not None else GoldenBlock(
                golden_pass(sessions, x, info.run_batch or len(x), cone_keep))
        goldens: dict[str, np.ndarray] = {}
        whole_golden: np.ndarray | None = None
        for group in _walks(shards, runners, config.batch, workers if pool is not None else 1):
            runner = runners[group[0].site]
            rows_of = [shard_rows(s, hi - lo) for s in group]
            rngs = [shard_rng(config.seed, s.site, s) for s in group]
            job: Callable[[], list[dict[str, np.ndarray]]]
            if runner.cone is not None:  # the group's shards share one walk
                golden_of = [golden_block[info.scores][r] for r in rows_of]
                job = partial(runner.inject_many, golden_block, rows_of, rngs, golden_of)
            elif runner.whole is not None:
                # that session is not the prefix's: its golden is its own fault-free run, once per block
                if whole_golden is None:
                    whole_golden = np.concatenate([runner.whole.golden(x[i:i + step])
                                                   for i in range(0, len(x), step)])
                golden_of = [whole_golden[rows_of[0]]]
                job = partial(_one, runner.inject, cache, rows_of[0], rngs[0], golden_of[0])
            else:
                site = group[0].site
                if config.opt_level not in SAME_KERNELS and site not in goldens:
                    goldens[site] = runner.null_scores(cache, hi - lo)
                golden_of = [goldens.get(site, prefix_scores)[rows_of[0]]]
                job = partial(_one, runner.inject, cache, rows_of[0], rngs[0], golden_of[0])
            if pool is None:
                record(group, rows_of, golden_of, lo, job())
            else:
                pending.append((group, rows_of, golden_of, lo, pool.submit(job)))
                settle(2 * workers)  # enough queued that no worker waits for the journal
        settle(0)

    try:
        for block in sorted({s.block for s in todo}):
            run_block(block)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()


def _one(inject: Callable[..., dict[str, np.ndarray]], *args: Any) -> list[dict[str, np.ndarray]]:
    """One shard's result as a group's list of results."""
    return [inject(*args)]


def _walks(shards: Sequence[Shard], runners: dict[str, SiteRunner], batch: int, workers: int = 1) -> list[list[Shard]]:
    """The block's shards in file order, consecutive shards of one cone site joined up to its walk size;
    every other shard alone.

    With several workers, joined groups are split again (largest first) until
    there are two per worker where the shards allow: a block of few sites would
    otherwise leave cores idle while one long walk runs.
    """
    groups: list[list[Shard]] = []
    for shard in shards:
        runner = runners[shard.site]
        last = groups[-1] if groups else None
        if (last is not None and runner.cone is not None and last[0].site == shard.site
                and sum(s.count for s in last) + shard.count <= runner.group_rows(batch, workers)):
            last.append(shard)
        else:
            groups.append([shard])
    while workers > 1 and len(groups) < 2 * workers:
        at = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[at]) == 1:
            break
        half = len(groups[at]) // 2
        groups[at:at + 1] = [groups[at][:half], groups[at][half:]]
    return groups


def _prefix_block(info: GraphInfo, prefix: Any, x: np.ndarray, step: int, needs: set[str],
                  pool: ThreadPoolExecutor | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One fault-free run of a block's images through the prefix session, `step` images a run (several at once
    on a pool): the cached tensors and the scores."""
    names = sorted(needs - {info.input_name})
    scores: list[np.ndarray] = []
    parts: list[list[np.ndarray]] = [[] for _ in names]
    chunks = [{info.input_name: x[start:start + step]} for start in range(0, len(x), step)]
    run = partial(prefix.run, [info.scores, *names])
    for values in (pool.map(run, chunks) if pool is not None else map(run, chunks)):
        scores.append(values[0])
        for acc, v in zip(parts, values[1:]):
            acc.append(v)
    # a tensor without a batch axis is one value for the whole block (a block is one image where it can vary)
    cache = {name: np.concatenate(acc) if info.image_rows(name) else acc[0] for name, acc in zip(names, parts)}
    cache[info.input_name] = x
    return cache, np.concatenate(scores)


def _records(shard: Shard, site: Site, res: dict[str, np.ndarray], golden_scores: np.ndarray,
             ids: np.ndarray, probabilities: bool) -> list[dict[str, Any]]:
    golden_class = np.argmax(golden_scores, axis=1)
    cls, nonfinite, loss = outcome(res["scores"], golden_class, probabilities)
    with np.errstate(invalid="ignore"):
        dloss = np.abs(loss - outcome(golden_scores, golden_class, probabilities)[2])
    def nums(values: np.ndarray) -> list[float | str]:
        with np.errstate(all="ignore"):
            v = np.asarray(values, dtype=np.float64)
        return v.tolist() if np.isfinite(v).all() else [num(x) for x in v.tolist()]

    cols = zip(ids.tolist(), res["elems"].tolist(), res["bits"].tolist(), nums(res["golden"]), nums(res["faulty"]),
               golden_class.tolist(), cls.tolist(), nonfinite.tolist(), nums(dloss))
    return [{"type": "fault", "shard": shard.index, "site": site.name, "kind": site.kind, "image": image,
             "element": element, "bits": bits, "golden": gold, "faulty": faulty, "golden_class": gc,
             "faulty_class": fc, "sdc": fc != gc, "nonfinite": nf, "dloss": dl}
            for image, element, bits, gold, faulty, gc, fc, nf, dl in cols]


def write_summary(summary: CampaignSummary, path: str | os.PathLike[str]) -> None:
    """Write the summary JSON atomically."""
    from harden.files import write_json

    write_json(Path(path), summary.to_dict())
