"""Evaluation of a trained model (a run directory or a Hugging Face directory): `zili eval`.

- `perplexity.py`  loss, perplexity and bits per byte on a prepared dataset's validation split or a text file.
- `harness.py`     the `zili` model class for lm-evaluation-harness (imports lm-eval: the `eval` extra).
- `tasks.py`       `zili eval --tasks`: lm-eval's `simple_evaluate` on that class, its table and results JSON.
"""
