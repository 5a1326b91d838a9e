"""Quality evaluations behind `infeng eval`.

- ``perplexity``: documents → PPL ± standard error; KL-divergence against a live or saved
  (top-k, .npz) baseline; model identity for reports.
- ``humaneval`` + ``sandbox``: completions through the Engine, graded in limited processes; pass@k.
- ``gsm8k``: k-shot prompts from hand-written exemplars, answer extraction, exact match.
- ``suite``: suite YAML, per-metric tolerances, the regression diff against a stored report.
- ``runner``: one function per task (options in, flat metrics and per-item records out).
"""
