"""Time of the exact final-layer analysis, and its speed-up over brute-force injection of the same faults.

For each model given, on N evaluation images of a dataset (the campaign's kept
images: correct with Top2Diff > 0):

1. exact: `harden.fi.exact_onnx.analyse_model` enumerates every element × bit ×
   image of the final layer's weights, bias, inputs and outputs (timed end to
   end, including the golden ORT run and range profiling).
2. brute force, ORT head-only: the graph cut at the head's input (onnx.utils
   extractor), weights fed as inputs; one ORT run over all N images per
   (element, bit) for weights, one batched run per (element, bit) for
   activations. A seeded random sample of (element, bit) per site is timed and
   the time is EXTRAPOLATED to every fault; the sample's SDC fraction is shown
   beside the exact one as a sanity check.
3. brute force, the sampled engine: `run_campaign` on the head's layers gives
   injections/s, EXTRAPOLATED to every fault of the exact enumeration.

    .venv/bin/python tools/bench_exact.py MODEL.onnx [MODEL2.onnx ...] [--data fashion-mnist:test]
        [--images 1000] [--all-images] [--sample 128] [--engine-injections 2000] [--policy none] [--json out.json]
        [--preprocess identity]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _head_model(model: onnx.ModelProto, head, weights: list[str]) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """The head subgraph from its input tensor to the model output, with `weights` as graph inputs. Its batch
    is left free (the model zoo's graphs fix it at 1), so that every image runs at once."""
    inferred = onnx.shape_inference.infer_shapes(model)
    cut = onnx.utils.Extractor(inferred).extract_model([head.input], [model.graph.output[0].name])
    del cut.graph.value_info[:]
    for value in [*cut.graph.input, *cut.graph.output]:
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].dim_param = "N"
    for name in weights:
        init = next(t for t in cut.graph.initializer if t.name == name)
        cut.graph.initializer.remove(init)
        cut.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init.dims)))
    return cut


def brute_force(model: onnx.ModelProto, inputs: np.ndarray, result, sites, top1_exact, sample: int,  # type: ignore[no-untyped-def]
                seed: int) -> dict:
    """Time a random sample of (element, bit) faults per site with ORT, extrapolate to all of them,
    and compare each sampled fault's SDC count over all images with the closed form's."""
    from harden.fi.bitflip import WIDTH
    from harden.fi.exact import fault_sdc
    from harden.fi.outcome import fault_outcome
    from harden.fi.exact_onnx import head_tensors, locate_head, stored_to_element
    from harden.fi.exact_site import flip_bit
    from harden.graph.ort import expose, make_session, run_batched

    head = locate_head(model)
    consts = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    weights = [s.tensor for s in result.sites if s.tensor in consts]
    session = make_session(_head_model(model, head, weights), opt_level="disable")
    golden = dict(zip(head_tensors(head), run_batched(make_session(expose(model, head_tensors(head)),
                                                                   opt_level="disable"),
                                                      inputs, head_tensors(head))))
    feats = golden[head.input]
    base_feeds = {head.input: feats, **{w: consts[w] for w in weights}}
    out = model.graph.output[0].name
    top1 = session.run([out], base_feeds)[0].reshape(len(inputs), -1).argmax(1)
    rng = np.random.default_rng(seed)
    width = WIDTH[result.fmt]
    total_s, total_faults, rows = 0.0, 0, []
    if not np.array_equal(top1, top1_exact):
        raise SystemExit("the head-only ORT run disagrees with the full model on the golden classes")
    by_tensor = {s.tensor: s for s in sites}
    for site in result.sites:
        n_faults = site.elements * width
        picks = rng.choice(n_faults, size=min(sample, n_faults), replace=False)
        sdc = 0
        per_fault: list[int] = []
        if site.tensor in consts:
            value = consts[site.tensor]
            start = time.perf_counter()
            for p in picks:
                k, bit = divmod(int(p), width)
                w = value.copy()
                w.ravel()[k] = flip_bit(value.ravel()[k:k + 1], bit, "fp32")[0]
                scores = session.run([out], {**base_feeds, site.tensor: w})[0].reshape(len(inputs), -1)
                per_fault.append(int(fault_outcome(scores, top1)[0].sum()))
            seconds = time.perf_counter() - start
        elif site.tensor == head.input:
            start = time.perf_counter()
            for p in picks:
                k, bit = divmod(int(p), width)
                f = feats.copy()
                f.reshape(len(f), -1)[:, k] = flip_bit(feats.reshape(len(f), -1)[:, k], bit, "fp32")
                scores = session.run([out], {**base_feeds, head.input: f})[0].reshape(len(inputs), -1)
                per_fault.append(int(fault_outcome(scores, top1)[0].sum()))
            seconds = time.perf_counter() - start
        else:
            continue  # inner activations need another cut; their cost per run is the same order
        sdc = sum(per_fault)
        elements = picks // width
        if site.tensor in consts:
            elements = stored_to_element(head, site.tensor, elements)
        pairs = np.stack([elements, picks % width], axis=1)
        closed = fault_sdc(by_tensor[site.tensor], top1_exact, pairs, result.fmt)
        mismatched = int((closed != np.asarray(per_fault)).sum())
        cost = seconds / len(picks)
        total_s += cost * n_faults
        total_faults += n_faults * len(inputs)
        rows.append({"site": site.tensor, "sampled_faults": int(len(picks)) * len(inputs),
                     "sampled_sdc_fraction": sdc / (len(picks) * len(inputs)),
                     "exact_sdc_fraction": site.sdc_fraction, "sampled_pairs": int(len(picks)),
                     "pairs_where_closed_form_differs": mismatched, "seconds_per_fault_over_all_images": cost,
                     "extrapolated_seconds_all_faults": cost * n_faults})
    return {"sites": rows, "covered_faults": total_faults, "extrapolated_seconds": total_s}


def engine_rate(path: str, inputs: np.ndarray, labels: np.ndarray, layers: list[str], injections: int,
                work: str) -> float:
    """Injections/s of the sampled engine on the head's layers."""
    from harden.fi import CampaignConfig, run_campaign

    config = CampaignConfig(layers=",".join(layers), injections=injections, seed=0)
    summary = run_campaign(path, inputs, labels, config, work, progress=False, fresh=True)
    return float(summary.injections_per_s or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=128, help="(element, bit) faults timed per site")
    parser.add_argument("--engine-injections", type=int, default=2000)
    parser.add_argument("--policy", default="none", choices=("none", "range", "range-output"))
    parser.add_argument("--all-images", action="store_true",
                        help="analyse every image, not only the campaign's kept ones (correct, Top2Diff > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preprocess", help="as certify's --preprocess (e.g. identity for tools/zoo_sweep.py's npz)")
    parser.add_argument("--json")
    args = parser.parse_args()

    from harden.data import load_dataset
    from harden.fi import prepare_eval
    from harden.fi.exact_onnx import analyse_model, model_sites
    from harden.graph.model_input import model_inputs, parse_preprocess
    from harden.graph.onnx_io import load_model

    report = []
    for path in args.models:
        model = load_model(path)
        data = load_dataset(args.data, limit=args.images, seed=args.seed)
        x = model_inputs(model, data, parse_preprocess(args.preprocess) if args.preprocess else None)
        images = x if args.all_images else prepare_eval(model, x, data.labels).inputs
        start = time.perf_counter()
        result = analyse_model(model, images, policy=args.policy, profile_inputs=x)
        exact_s = time.perf_counter() - start
        _, sites, top1, _ = model_sites(model, images, policy=args.policy, profile_inputs=x)
        brute = brute_force(model, images, result, sites, top1, args.sample, args.seed)
        layers = sorted({s.layer for s in result.sites})
        work = f"/tmp/bench_exact_{len(report)}.jsonl"
        rate = engine_rate(path, x, data.labels, layers, args.engine_injections, work)
        total = result.total_faults
        entry = {"model": path, "head": result.head, "images_total": len(x), "images_kept": result.images,
                 "faults": total, "exact_seconds": exact_s, "exact_core_seconds": result.seconds,
                 "recomputed_in_float32": result.recomputed,
                 "sites": [{"tensor": s.tensor, "role": s.role, "faults": s.total_faults,
                            "sdc_fraction": s.sdc_fraction, "recomputed": s.recomputed} for s in result.sites],
                 "brute_ort_head": brute,
                 "brute_ort_head_speedup": brute["extrapolated_seconds"] * total / max(1, brute["covered_faults"])
                 / exact_s,
                 "engine_injections_per_s": rate,
                 "engine_extrapolated_seconds": total / rate if rate else None,
                 "engine_speedup": (total / rate) / exact_s if rate else None}
        report.append(entry)
        print(f"{path}: {result.head} head, {total:,} faults over {result.images} images "
              f"({'all' if args.all_images else 'kept'}) of {len(x)}")
        print(f"  exact: {exact_s:.1f} s end to end ({result.seconds:.1f} s enumeration, "
              f"{result.recomputed:,} faults recomputed in float32)")
        for s in result.sites:
            print(f"    {s.role:12s} {s.tensor:45s} {s.total_faults:>14,} faults  SDC {100 * s.sdc_fraction:.3f}%")
        print(f"    {'all sites':58s} {total:>14,} faults  SDC {100 * result.total_sdc / total:.3f}%")
        print(f"  brute force, ORT head-only (EXTRAPOLATED from {args.sample} sampled faults/site): "
              f"{brute['extrapolated_seconds']:.0f} s for the weight+input sites "
              f"→ speed-up ≈ {entry['brute_ort_head_speedup']:.0f}× (scaled to all faults)")
        for row in brute["sites"]:
            print(f"    {row['site']:45s} {row['sampled_pairs']} (element, bit) faults × {result.images} images: "
                  f"SDC count differs from the closed form for {row['pairs_where_closed_form_differs']} of them; "
                  f"sample SDC {100 * row['sampled_sdc_fraction']:.3f}% (all faults, exact: "
                  f"{100 * row['exact_sdc_fraction']:.3f}%)")
        if rate:
            print(f"  sampled engine: {rate:.0f} injections/s → all faults EXTRAPOLATED "
                  f"{total / rate:,.0f} s → speed-up ≈ {(total / rate) / exact_s:,.0f}×")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
