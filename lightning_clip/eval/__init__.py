"""The evaluation room: every measure of a model, one implementation each, used by the validation
callbacks, `python -m lightning_clip eval` and the ablation report.

- `retrieval`: recall@k, ranks, semantic recall, the oracle ceiling, recall by caption specificity;
- `ceilings`: the Bayes ceiling (the generator's own likelihood as the scorer);
- `geometry`: alignment and uniformity, modality gap, effective rank, dimensional collapse;
- `calibration`: predicted variance against retrieval errors (deciles, sparsification, AUSE);
- `zeroshot`, `probe`, `world_tasks`: zero-shot classification with prompt ensembles and linear probes on
  the synthetic world's attributes;
- `embed`: a model's deduplicated embeddings of a split; `suite`: all measures as CLIP_benchmark-style
  records; `cli`: the `eval` subcommand.
"""
