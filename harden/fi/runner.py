"""One fault site's injector: draw faults, corrupt the cached tensors, run the suffix.

Activation faults replace one element per batch row; weight faults become an
additive change of the layer's output (harden.fi.weights). Faults that are
provably masked (value unchanged, or a Relu input that stays negative) take the
golden scores without a run, which is exact and saves a large share of runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harden.fi.bitflip import peak_scale, tensor_scale
from harden.fi.cone import Cone, GoldenBlock, windows_reach_a_conv
from harden.fi.config import CampaignConfig
from harden.fi.faults import site_fault
from harden.fi.graphinfo import GraphInfo
from harden.fi.nodes import NODE_LEVEL, NodeSessions
from harden.fi.profile import clamp_to_range
from harden.fi.whole_model import WholeModel, needs_whole_model
from harden.fi.sites import Site, layer_node
from harden.fi.suffix import Suffix
from harden.fi.weights import NodeRerun, conv_delta, gemm_delta, matmul_delta
from harden.graph.ort import SharedWeights, expose, make_session


# At these ORT levels the prefix and every suffix run the same kernels, so the prefix's scores are
# each site's golden bit for bit (tested). 'all' changes layouts (NCHWc) per graph, so there the
# golden of a site is its own suffix run with no fault.
SAME_KERNELS = ("disable", "basic", "extended")

# What the cone walks running at once may hold, together, per tensor that they run whole (group_rows).
WALK_BYTES = 256 * 2**20
# Below this many multiply-adds per node (GraphInfo.macs_per_node), a graph whose rows are coupled runs the sites
# whose windows end at once as suffixes (walks_cone). Quantised dynamically, the demo's 28 px models carry
# 0.15 M per node and ran 2.3-2.6x faster so; of the model zoo's graphs, DenseNet-121 (2.0 M) and Inception v2
# (2.6 M) ran faster so too, Inception v1 (3.5 M) as fast, AlexNet (10 M), ResNet-50 (10 M) and VGG-19 (139 M)
# about twice as slowly (tools/zoo_sweep.py --dynamic).
SMALL_NODE_MACS = 3_000_000


def _as_rows(rows: slice | np.ndarray) -> np.ndarray:
    return np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)


class SiteRunner:
    """Everything needed to inject into one site: its suffix and, for weights, the layer's fast path."""

    def __init__(self, info: GraphInfo, site: Site, config: CampaignConfig, ranges: dict[str, float],
                 suffixes: dict[str, Suffix], threads: int = 0, sessions: NodeSessions | None = None,
                 whole: WholeModel | None = None, shared: SharedWeights | None = None) -> None:
        self.site, self.config = site, config
        self.fault = site_fault(config.fault, site)
        self.run_batch = info.run_batch
        node = info.nodes[info.node_index[site.node]]
        self.node = node
        self.via = info.nodes[info.node_index[site.via]] if site.via else None
        self.out = site.tensor if site.kind == "activation" else (self.via or node).output[0]
        self.acts = [n for n in (self.via or node).input if n and n not in info.constants]
        self.whole: WholeModel | None = None
        self.cone: Cone | None = None
        self._widest: int | None = None  # bytes per row of the largest tensor the cone walk may hold whole
        if needs_whole_model(info, site):  # no per-image layer output to start from: rerun the whole model
            self.whole = whole or WholeModel(info, [site], config.providers, config.opt_level, threads)
            self.needs = {info.input_name} | ({site.tensor} if site.kind == "activation" else set())
        elif sessions is not None:
            # the cone engine's golden tensors come from a node-by-node run, not the prefix; a weight fault's
            # walk starts at its layer's output, computed from the layer's golden input
            self.cone = Cone(info, sessions, self.out)
            self.needs = set()
        else:
            if self.out not in suffixes:
                suffixes[self.out] = Suffix(info, self.out, config.providers, config.opt_level, threads, shared)
            self.suffix = suffixes[self.out]
            self.needs = set(self.suffix.inputs)
        self.relu_only, self.add_other = _relu_masking(info, site)
        if self.cone is None and (self.whole is not None or self.add_other not in self.suffix.inputs):
            self.add_other = None  # the skip operand must be cached
        if site.kind == "activation":
            self.peak = float(ranges.get(site.tensor, 0.0))
            self.scale = peak_scale(self.peak, self.fault.format)
            return
        self.stored = info.constants[site.tensor]  # as the graph stores it (float16, or a QDQ graph's integers)
        # what the layer reads: in a QDQ graph, the stored integers decoded by their DequantizeLinear
        self.dequantized = info.dequantized.get(site.decoded) if site.decoded else None
        self.weight = info.constants[site.decoded] if site.decoded else self.stored.astype(np.float32)
        self.peak = float(np.max(np.abs(self.weight))) if self.weight.size else 0.0
        self.scale = tensor_scale(self.weight, self.fault.format)
        if self.whole is None and self.cone is None:
            self.needs.update(self.acts)
        self.rerun: NodeRerun | None = None
        # a QOperator bias (through its QLinearAdd) reruns that node, since the add requantises
        self.rerun_args = (info, self.via if self.via is not None else node, site.input_index, config.providers,
                           threads)

    def golden_values(self, cache: dict[str, np.ndarray], rows: slice | np.ndarray, elems: np.ndarray) -> np.ndarray:
        """The fault-free values of the chosen elements (one per batch row)."""
        if self.site.kind == "activation":
            r = _as_rows(rows)  # per image: a folded tensor's k rows of an image are one slice
            return cache[self.site.tensor].reshape(-1, self.site.elements)[r, elems].copy()
        return self.stored.reshape(-1)[elems].copy()

    def null_scores(self, cache: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Scores of the suffix with no fault, for levels whose kernels may differ between prefix and suffix."""
        parts = []
        step = 1 if self.run_batch else self.config.batch
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
        faults = self._draw(cache, r, rng)
        faults["scores"] = self.scores(cache, r, faults["elems"], faults["golden"], faults["faulty"], golden_scores)
        return faults

    def inject_many(self, cache: dict[str, np.ndarray], rows: Sequence[np.ndarray],
                    rngs: Sequence[np.random.Generator], golden_scores: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run several shards of this site and block in one walk; the same results as one `inject` each.

        Each shard draws its faults from its own generator, as alone. Only the
        cone engine takes this: its rows are independent and its windowed
        kernels give the same bits whatever the batch, and a walk's cost per
        node call is spread over more faults (2x on a 28 px ResNet-8).
        """
        assert self.cone is not None
        faults = [self._draw(cache, r, rng) for r, rng in zip(rows, rngs)]
        joined = {k: np.concatenate([f[k] for f in faults]) for k in ("elems", "golden", "faulty")}
        scores = self.scores(cache, np.concatenate(rows), joined["elems"], joined["golden"], joined["faulty"],
                             np.concatenate(golden_scores))
        for f, part in zip(faults, np.split(scores, np.cumsum([len(r) for r in rows])[:-1])):
            f["scores"] = part
        return faults

    def _draw(self, cache: dict[str, np.ndarray], r: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One shard's faults: elements, bits, golden and faulty values (clamped when the config says so)."""
        elems = rng.integers(0, self.site.elements, len(r))
        bits, uniforms = self.fault.draw(rng, len(r))
        golden = self.golden_values(cache, r, elems)
        faulty = self.fault.apply(golden, bits, uniforms, self.scale, self.peak)
        if self.config.clamp == "range":
            faulty = clamp_to_range(faulty, self.peak)
        return {"elems": elems, "bits": bits, "golden": golden, "faulty": faulty}

    def group_rows(self, batch: int, workers: int = 1) -> int:
        """How many faults one cone walk may carry: its share of a memory budget shared by the `workers` walks
        running at once, over the largest tensor a walk may hold whole per row; between one batch and 16."""
        if self.run_batch:  # a fixed-batch model's nodes take its own batch only, a coupled one's one image
            return self.run_batch
        if self.cone is None:
            return batch
        if self._widest is None:
            info = self.cone.info
            self._widest = max((int(np.prod(info.tensors[t].shape[1:], dtype=np.int64)) * info.tensors[t].dtype.itemsize
                                for t in self.cone.needs() if t in info.tensors and info.tensors[t].batched), default=1)
        return int(min(16 * batch, max(batch, WALK_BYTES // workers // max(self._widest, 1))))

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
                    out[live] = self._run(cache, r[live], elems[live], golden[live], faulty[live],
                                          out[live])
                return out
        return self._run(cache, r, elems, golden, faulty, golden_scores)

    def _run(self, cache: dict[str, np.ndarray], r: np.ndarray, elems: np.ndarray, golden: np.ndarray,
             faulty: np.ndarray, golden_scores: np.ndarray | None) -> np.ndarray:
        """Scores of rows that need a run: through the cone engine, or the suffix."""
        if self.cone is not None:
            assert isinstance(cache, GoldenBlock) and golden_scores is not None
            if self.site.kind == "activation":
                return self.cone.scores(cache, r, elems, faulty, golden_scores)[0]
            return self.cone.walk(cache, r, self._weight_output(cache, r, elems, golden, faulty), golden_scores)[0]
        if self.whole is not None:
            x = cache[self.whole.info.input_name][r]
            if self.site.kind == "activation":
                return self.whole.activation_scores(self.site.tensor, x, elems, faulty)
            return self.whole.weight_scores(self.site.tensor, x, elems, faulty)
        # contiguous rows (the usual case) are fed as views; only the corrupted tensor is copied
        pick: slice | np.ndarray = slice(int(r[0]), int(r[-1]) + 1) if len(r) and r[-1] - r[0] == len(r) - 1 else r
        # a cut tensor without a batch axis (a sibling of the site, see GraphInfo.cut) is fed whole
        feeds = {k: cache[k][pick] if self.suffix.image_rows[k] else cache[k] for k in self.suffix.inputs}
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
        read_golden, read_faulty = self._read(golden, elems), self._read(faulty, elems)
        if self.via is not None and self.via.op_type == "Add":
            # bias through an Add: recompute the touched outputs as the Add does, one float32 addition each
            a = cache[self.acts[0]][rows].reshape(len(rows), -1)
            flat = y.reshape(len(rows), -1)
            per_image = (1, *y.shape[1:])
            for i, (e, f) in enumerate(zip(elems.tolist(), read_faulty)):
                unit = np.zeros(self.weight.shape, dtype=bool)
                unit.flat[e] = True
                pos = np.flatnonzero(np.broadcast_to(unit, per_image))
                with np.errstate(all="ignore"):
                    flat[i, pos] = a[i, pos] + f
            return y
        with np.errstate(all="ignore"):
            delta = read_faulty - read_golden
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
            # a tensor without image rows is one value per run, this image's (whole_model.needs_whole_model)
            acts = {a: cache[a][rows] if self.rerun.image_rows[a] else cache[a] for a in self.acts}
            if self.site.decoded:  # the layer reads the decoded float tensor: rerun it with that
                self.rerun.apply(self.site.decoded, self.weight, elems, read_faulty, acts, y)
            else:
                self.rerun.apply(self.site.tensor, self.stored, elems, faulty, acts, y)
        return y

    def _read(self, values: np.ndarray, elems: np.ndarray) -> np.ndarray:
        """What the layer reads for weight elements `elems` holding `values`: float32, decoded from a QDQ
        graph's stored integers by the DequantizeLinear's own arithmetic."""
        if self.dequantized is None:
            return values.astype(np.float32)
        return self.dequantized.decode(values, self.stored.shape, elems)


def walks_cone(info: GraphInfo, site: Site) -> bool:
    """Whether the cone engine walks this site's faults node by node, rather than running its suffix.

    Every site that does not rerun the whole model walks, except in a small
    graph whose rows are coupled (a dynamically quantised one). There every
    run is one image, and a walk's windows end at the first dynamic quantiser,
    which takes the whole tensor. What a walk still saves is the rest of a
    fault that ends early (requantised back to the golden integers, or eaten
    by a Relu), against one ORT call per node. On a graph whose nodes carry
    little arithmetic each (`SMALL_NODE_MACS`), a site whose windows meet no
    Conv (an activation of a graph quantised throughout; any weight, whose
    fault changes a whole channel) runs its suffix in one call instead: the
    same records, and `harden inject` 2.3-2.6x faster on the demo's models.
    On the model zoo's graphs at 224 px the walks' early ends win
    (docs/benchmarks.md).
    """
    if needs_whole_model(info, site):
        return False
    if not info.coupling or info.macs_per_node >= SMALL_NODE_MACS:
        return True
    return site.kind == "activation" and windows_reach_a_conv(info, site.tensor)


def golden_needs(info: GraphInfo, site: Site) -> set[str]:
    """The golden tensors the cone engine reads for `site`: its walk's, and for a weight its layer's input."""
    if site.kind == "activation":
        return Cone(info, None, site.tensor).needs()
    node = layer_node(info, site)
    return Cone(info, None, node.output[0]).needs() | {t for t in node.input if t and t not in info.constants}


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


def session_levels(level: str, engine: str = "suffix") -> dict[str, str]:
    """What a campaign runs: the prefix's and the suffixes' ORT levels, where goldens come from, and for the
    cone engine how activation and weight faults are run (the prefix and suffixes then serve only the
    whole-model sites)."""
    golden = "prefix run" if level in SAME_KERNELS else "fault-free run of each site's suffix"
    levels = {"prefix": prefix_level(level), "suffix": level, "golden": golden}
    if engine == "cone":
        levels["activations"] = (f"cone engine: single-node sessions at level {NODE_LEVEL}, golden from a "
                                 "node-by-node run")
        levels["weights"] = ("cone engine: the faulty layer output (golden plus the fault's change) walks the "
                             "same single-node sessions on whole maps")
        levels["coupled"] = ("in a graph whose rows are coupled (dynamic quantisation), weights and activations "
                             "whose windows meet no Conv run their suffix instead (runner.walks_cone)")
    return levels


def prefix_cache(info: GraphInfo, runners: Sequence[SiteRunner], x: np.ndarray,
                 config: CampaignConfig, threads: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One fault-free run of `x` caching every tensor the runners' suffixes read; also the golden scores."""
    names = sorted(set().union(*(r.needs for r in runners)) - {info.input_name})
    session = make_session(expose(info.model, names), config.providers, opt_level=prefix_level(config.opt_level),
                           threads=threads, spinning=False)
    values = session.run([info.scores, *names], {info.input_name: x})
    cache = dict(zip(names, values[1:]))
    cache[info.input_name] = x
    return cache, values[0]
