"""The end-to-end demo on MNIST-5k at toy size: every stage runs, the table is built, a rerun reuses all."""

import json
from pathlib import Path

import pytest

from harden.demo import DemoConfig, run_demo
from harden.demo.table import markdown_table


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_stages(tmp_path: Path) -> None:
    config = DemoConfig(workdir=str(tmp_path / "demo"), dataset="mnist5k", epochs=1, train_limit=256,
                        eval_limit=128, certify_limit=64, injections=8, heads=("text",),
                        protocols=("none", "range"), threads=2, progress=False)
    lines: list[str] = []
    first = run_demo(config, log=lines.append)
    assert [r["name"] for r in first.rows] == ["text-vs-baseline-clamp-none", "text-vs-baseline-clamp-range"]
    for row in first.rows:
        assert row["final_layer"]["sites_model"] and row["final_layer"]["sites_baseline"]
        # The heads are found in the graph: the baseline's Gemm (output, weight, bias) and the text head's
        # projection and cosine layers; no backbone convolution may leak in (exporters name weights differently).
        assert len(row["final_layer"]["sites_baseline"]) == 3
        assert len(row["final_layer"]["sites_model"]) == 5
        assert not any("Conv" in site for site in row["final_layer"]["sites_model"] + row["final_layer"]["sites_baseline"])
        assert row["exact_final_layer"], "the exact analysis must cover both heads"
        assert 0.0 <= row["overall"]["model"]["value"] <= 1.0
    table = markdown_table(first.rows)
    assert table.count("\n") == 3 and "text vs baseline" in table
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(first.rows))

    lines.clear()
    second = run_demo(config, log=lines.append)
    reused = [line for line in lines if line.startswith("reusing")]
    assert len(reused) == 1 + 2 + 2 + 2  # embeddings, two checkpoints, two exports, two reports
    assert second.rows == first.rows


def test_variants_and_template_vocabulary(tmp_path: Path) -> None:
    from harden.demo.pipeline import _vocabulary, variants
    from harden.errors import HardenError
    from harden.text import load_descriptions

    plan = variants(DemoConfig(heads=("text", "templates"), full=True))
    assert [(v.name, v.head, v.vocabulary, v.baseline) for v in plan] == [
        ("baseline", "baseline", "descriptions", "baseline"), ("text", "text", "descriptions", "baseline"),
        ("templates", "text", "templates", "baseline"), ("lite0-baseline", "baseline", "descriptions", "lite0-baseline"),
        ("lite0-text", "text", "descriptions", "lite0-baseline")]
    with pytest.raises(HardenError):
        variants(DemoConfig(heads=("clip",)))
    _vocabulary("builtin:mnist", tmp_path, "minilm", print, templates=True)
    templates = load_descriptions(tmp_path / "templates.json")
    assert set(templates.sources.values()) == {"template"}
    assert any("a photo of" in text for text in templates.descriptions["7"])
