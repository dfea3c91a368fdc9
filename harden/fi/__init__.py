"""Fault injection at the ONNX Runtime level: bit flips, sites, campaigns and statistics.

Public API (what `harden inject` and `harden certify` call):

- `GraphInfo(model, example=None)`: analysis of a classifier graph (one image
  input, class scores N×C as output 0); raises HardenError otherwise.
- `list_sites(model_or_info, include_all_tensors=False) -> list[Site]`: activation
  sites (outputs of Conv/Gemm/MatMul/ConvTranspose, or every float tensor) and
  weight sites (constant float inputs of those nodes, biases included), in graph order.
- `select_sites(sites, spec, kinds=("activation", "weight"))`: spec is 'all',
  'last' (the classifier node), names (site, tensor or node) or 're:REGEX', comma-separated.
- `FaultModel(kind='flip'|'stuck-at-0'|'stuck-at-1'|'random', fmt=None|'fp32'|'fp16'|'bf16'|'fp8-e4m3'|'fp8-e5m2'|'int8'
  |'uint8'|'int32', bits=None, k=1)`; fmt None is what each site stores (fp32, fp16 in a float16 graph, a quantised
  graph's stored integers), fixed per campaign by `resolve_format(fault, sites)` where the sites agree, and
  per site by `site_fault(fault, site)`.
- `CampaignConfig(...)`: layers, kinds, injections or margin, fault, clamp, seed,
  batch, providers, opt_level, confidence, ci, all_tensors, shard, engine; `to_dict`/`from_dict`.
- `prepare_eval(model, inputs, labels, tensors, profile_inputs=None, ...) -> EvalSet`:
  golden run, keep correct images with Top2Diff > 0, profile ranges of `tensors`.
- `run_campaign(model_path_or_proto, inputs, labels, config, out_jsonl, progress=True,
  profile_inputs=None, fresh=False, threads=0) -> CampaignSummary`: runs or resumes a campaign;
  `inputs` are model-ready float32 arrays (see `harden.graph.model_input.model_inputs`);
  `threads` is how many CPU threads it uses (0: every CPU; sessions never spin-wait): that
  many runs at once, each on one ORT thread (harden.graph.parallel). It changes speed only,
  never a byte of the file.
- `summarise_jsonl(path, confidence=None, ci=None) -> CampaignSummary` and
  `merge_shards(paths, out) -> CampaignSummary` (joins `--shard i/n` parts).
- `CampaignSummary.layers: list[LayerResult]` (site, kind, node, op_type, elements,
  injections, sdc: Rate, nonfinite: Rate, mean_abs_dloss, golden_top2diff, by_bit),
  `CampaignSummary.layer(name)`, `to_dict`/`from_dict`, `table()`.
- Slow references for tests and audits: `harden.fi.reference` (`activation_full`,
  `weight_full`: whole-model runs with a spliced Where node or a changed initializer).

Engine layout: `plan` (shards and their seeds), `runner` (one site: suffix or
cone, weight deltas from `weights`, exact masking), `engine` (campaign loop),
`journal` (resumable JSONL), `summary` (per-layer results).

Two engines run faults (`CampaignConfig.engine`). `cone` (default)
walks the nodes downstream of the site one at a time (`nodes`: single-node
sessions at level 'all') on per-row windows (`window`): pointwise ops and
channel concats run on the window, Conv and pooling on a crop of the padded
golden input, anything else on whole tensors; rows whose only faulty value has
become bit-identical to the golden are finished early with the golden scores.
Golden tensors and scores come from a node-by-node run of the same kernels, so
the cone's results equal a whole-graph run bit for bit (tested). A weight
fault's changed layer output (a whole channel, so no window) walks the same
sessions on whole maps. `suffix` runs the extracted downstream subgraph at
`opt_level`.

Optimisation levels: faults always enter through the declared tensor, because
every suffix is cut at it and the prefix exposes it, whatever the level. At
'disable' (default), 'basic' and 'extended' the prefix's scores are each site's
golden bit for bit; at 'all' (NCHWc layouts, about 2-3x faster on CPU) each
site's golden comes from its own fault-free suffix run (once per site and cached
image block), so a null fault is still exactly the golden; the summary's
`session_levels` records the prefix's and the suffixes' levels. On the bench
models 'all' gives the same SDC verdict for every fault as 'disable', but its
recorded |Δloss| differs in the last bits, which is why it is not the default.
"""

from harden.fi.config import CampaignConfig
from harden.fi.engine import run_campaign
from harden.fi.faults import FaultModel
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import merge_journals
from harden.fi.prepare import EvalSet, prepare_eval
from harden.fi.sites import Site, list_sites, select_sites
from harden.fi.summary import CampaignSummary, LayerResult, summarise_jsonl


def merge_shards(paths: list[str], out: str) -> CampaignSummary:
    """Join the parts of a sharded campaign into `out` and summarise the result."""
    from harden.fi.summary import summarise_contents

    return summarise_contents(merge_journals(paths, out))


__all__ = [
    "CampaignConfig", "CampaignSummary", "EvalSet", "FaultModel", "GraphInfo", "LayerResult", "Site",
    "list_sites", "merge_shards", "prepare_eval", "run_campaign",
    "select_sites", "summarise_jsonl",
]
