"""Certification: campaigns plus exact final-layer analysis, gates on confidence bounds, report.json/html.

Public API:

- `certify(CertifyConfig) -> Report` (harden.report.certify): runs everything and writes REPORT_DIR.
- `Report`, `ModelRecord`, `Improvement`, `Gate`, `Verdict`, `Cost` (harden.report.schema): the
  versioned report.json schema (`SCHEMA_VERSION`), each with `to_dict`/`from_dict`; `Report.load/save`.
- `evaluate(model_summary, baseline_summary, max_sdc, min_improvement, scope) -> (Verdict, improvements)`
  and `check_gates` (harden.report.gates); `bool(verdict)` means every gate passed.
- `measure_cost(model, example) -> Cost` (harden.report.cost), `write_plots`, `render_html`.
"""
