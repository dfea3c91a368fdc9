"""report.html: the verdict, the numbers and the figures in one self-contained page.

The figures are embedded (base64 PNG) so the page can be attached to a CI run
or an e-mail on its own; the same PNGs sit beside it for other uses.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from harden.files import atomic_open
from harden.report.schema import ModelRecord, Report


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _model_section(m: ModelRecord) -> str:
    c = m.campaign
    exact = {s.tensor: s for s in m.exact.sites} if m.exact is not None else {}
    rows = [[layer.site, layer.kind, layer.op_type, str(layer.injections), _pct(layer.sdc.value),
             f"[{_pct(layer.sdc.low)}, {_pct(layer.sdc.high)}]",
             _pct(exact[layer.site].sdc_fraction) if layer.site in exact else "-", _pct(layer.nonfinite.value)]
            for layer in c.layers]
    parts = [f"<h2>{html.escape(m.role)}: {html.escape(m.path)}</h2>",
             f"<p>sha256 <code>{m.sha256}</code>; clean accuracy {_pct(m.accuracy.value)} "
             f"[{_pct(m.accuracy.low)}, {_pct(m.accuracy.high)}] on {m.accuracy.n} images; "
             f"{c.evaluation.get('kept', 0)} kept for injection (correct, Top2Diff &gt; 0). "
             f"Parameters {m.cost.parameters:,}, FLOPs/image {m.cost.flops:,}, latency "
             f"{m.cost.latency_ms:.3f} ms per batch of {m.cost.latency_batch}.</p>",
             _table(["site", "kind", "op", "injections", "SDC (sampled)", f"{c.config.confidence:.0%} CI",
                     "SDC (exact)", "non-finite"], rows)]
    if m.exact is not None:
        ex = m.exact
        erows = [[s.tensor, s.role, f"{s.total_faults:,}", _pct(s.sdc_fraction), _pct(s.due_fraction),
                  "-" if s.hit_faults is None or not sum(s.hit_faults) else
                  _pct(sum(s.hit_sdc or []) / sum(s.hit_faults)), f"{s.recomputed:,}"] for s in ex.sites]
        ties = (f" ({ex.rounding_ties} more left out: their fault-free top-1 is a float32 rounding tie)"
                if ex.rounding_ties else "")
        parts += [f"<h3>Exact final-layer analysis ({ex.head} head, policy {ex.policy}, {ex.fmt}, "
                  f"{ex.images} images{ties}, {ex.seconds:.1f} s)</h3>",
                  "<p>Every element × bit × image, in closed form; no sampling error. "
                  "'hit top-1' is the SDC fraction of faults in the row of the image's own top-1 class.</p>",
                  _table(["tensor", "role", "faults", "SDC (exact)", "non-finite", "SDC when hit class is top-1",
                          "float32 recomputed"], erows)]
    elif m.exact_skipped:
        parts.append(f"<p>Exact final-layer analysis not run: {html.escape(m.exact_skipped)}</p>")
    return "\n".join(parts)


def render_html(report: Report, plots: dict[str, str], folder: str | os.PathLike[str],
                path: str | os.PathLike[str]) -> None:
    """Write the page for `report`, embedding the PNGs named in `plots` from `folder`."""
    v = report.verdict
    status = "PASSED" if v else "FAILED"
    gates = _table(["gate", "bound", "op", "threshold", "result", "detail"],
                   [[g.name, f"{g.value:.4g}", g.op, f"{g.threshold:.4g}", "pass" if g.passed else "FAIL", g.detail]
                    for g in v.gates]) if v.gates else "<p>No gates requested.</p>"
    imp = _table(["scope", "baseline SDC", "model SDC", "improvement", "interval"],
                 [[i.scope, _pct(i.baseline.value), _pct(i.model.value), f"{i.point:.3g}×",
                   f"[{i.low:.3g}, {i.high:.3g}]"] for i in report.improvements]) if report.improvements else ""
    over = _table(["overhead", "value"], [[k, "-" if val is None else f"{val:.4g}"]
                                          for k, val in report.overhead.items()]) if report.overhead else ""
    figures = []
    for name, file in plots.items():
        data = base64.b64encode((Path(folder) / file).read_bytes()).decode()
        figures.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{file}'
                       "</figcaption></figure>")
    env = report.environment
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>harden certify: {status}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} .PASSED{{color:green}} .FAILED{{color:#b00}} img{{max-width:100%}}</style>
</head><body><h1>harden certify: <span class="{status}">{status}</span></h1>
<p>schema {html.escape(report.schema)}; created {html.escape(str(env.get('created')))}; python
{html.escape(str(env.get('python')))}; packages {html.escape(str(env.get('packages')))}; CPU
{html.escape(str(env.get('cpu')))}; ONNX Runtime's uint8 × int8 kernels here
{html.escape(str(env.get('uint8_int8_kernels')))}</p>
<h2>Gates</h2>{gates}
{'<h2>Improvement over the baseline</h2>' + imp if imp else ''}
{'<h2>Overhead of the model over the baseline</h2>' + over if over else ''}
{''.join(_model_section(m) for m in report.models)}
<h2>Figures</h2>{''.join(figures)}
<h2>Configuration</h2><pre>{html.escape(str(report.config))}</pre>
</body></html>
"""
    with atomic_open(path) as handle:
        handle.write(page)
