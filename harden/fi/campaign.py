"""Campaigns from files: a model path and a dataset spec in, a JSONL file and a summary JSON out.

This is the one call behind `harden inject`; `run_campaign` is the array-level
entry point that other stages (certify) use directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from harden.data import Preprocess, load_dataset
from harden.errors import HardenError
from harden.fi.config import CampaignConfig
from harden.fi.engine import run_campaign, write_summary
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import merge_journals
from harden.fi.sites import Site, list_sites
from harden.fi.summary import CampaignSummary, summarise_contents
from harden.graph.model_input import input_dims, load_inputs, model_inputs, model_preprocess, select_scores
from harden.graph.onnx_io import load_model


def summary_path_for(out_jsonl: str | os.PathLike[str]) -> Path:
    """campaign.jsonl → campaign.summary.json, beside it."""
    out = Path(out_jsonl)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def sites_of_file(model_path: str | os.PathLike[str], all_tensors: bool = False, data: str | None = None,
                  preprocess: Preprocess | None = None, output: str | None = None) -> list[Site]:
    """The fault sites of a model file (for `--list-sites`); `data` gives the shape of symbolic inputs,
    `output` the class-score output of a model with several."""
    model = select_scores(load_model(model_path), output)
    example = None
    if data is not None and None in input_dims(model):
        example = model_inputs(model, load_dataset(data, limit=1), preprocess)
    return list_sites(GraphInfo(model, example=example), include_all_tensors=all_tensors)


def inject_dataset(model_path: str | os.PathLike[str], data: str, config: CampaignConfig,
                   out_jsonl: str | os.PathLike[str], limit: int | None = None, data_seed: int = 0,
                   profile: str | None = None, profile_limit: int | None = None,
                   preprocess: Preprocess | None = None, summary_path: str | os.PathLike[str] | None = None,
                   progress: bool = True, fresh: bool = False, threads: int = 0,
                   output: str | None = None) -> CampaignSummary:
    """Load data, apply the model's preprocessing, run or resume the campaign and write its summary.

    threads: CPU threads (0: every CPU), as many runs at once on one ORT thread each; results do not
    depend on it. output: the class-score output of a model with several (the header then records the
    hash of the model cut down to it, not of the file).
    """
    if Path(out_jsonl).resolve() == Path(model_path).resolve():
        raise HardenError(f"refusing to overwrite the input {model_path}; choose another --out")
    loaded = load_model(model_path)
    model = select_scores(loaded, output)
    prep = model_preprocess(model, preprocess)
    inputs, labels = load_inputs(model, data, limit, data_seed, prep)
    profile_inputs = None
    if profile is not None:
        profile_inputs = load_inputs(model, profile, profile_limit, data_seed, prep)[0]
    summary = run_campaign(model_path if model is loaded else model, inputs, labels, config, out_jsonl,
                           progress=progress, profile_inputs=profile_inputs, fresh=fresh, threads=threads)
    write_summary(summary, summary_path or summary_path_for(out_jsonl))
    return summary


def merge_files(parts: list[str], out_jsonl: str | os.PathLike[str],
                summary_path: str | os.PathLike[str] | None = None) -> CampaignSummary:
    """Merge `--shard` parts into one campaign file and write its summary."""
    for part in parts:
        if Path(part).resolve() == Path(out_jsonl).resolve():
            raise HardenError(f"refusing to overwrite the part {part}; choose another --out")
    summary = summarise_contents(merge_journals(parts, out_jsonl))
    write_summary(summary, summary_path or summary_path_for(out_jsonl))
    return summary

