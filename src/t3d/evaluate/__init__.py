"""Evaluation in the joint image-text space and on held-out studies (docs/method.md §6).

``t3d evaluate zeroshot``  prompt-pair zero-shot classification of findings (``zeroshot.py``)
``t3d evaluate retrieval`` image <-> report Recall@1/5/10 (``retrieval.py``)

Building blocks: ``joint.py`` (a checkpoint as an evaluator: study and text embeddings), ``t3d.data.grid``
(deterministic crops covering a study), ``studies.py`` (preprocess held-out data, splits, reports), ``report.py``
(metrics.json, report.md, figures). Classification metrics with bootstrap intervals are in ``t3d.metrics``.
"""
