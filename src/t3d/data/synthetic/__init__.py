"""Synthetic CT + report benchmark: torso volumes with organ/lesion labels and reports that describe them.

``generate_dataset`` writes a dataset folder (``t3d synth``); ``sample_study`` makes one study in memory.
Modules: ``anatomy`` (torso, tissues, rendering to HU), ``findings`` (finding types, drawing, ground truth),
``reports`` (FINDINGS / IMPRESSION text), ``study`` (presets, seeding, one study), ``command`` (files + CLI).
"""

from t3d.data.synthetic.command import generate_dataset
from t3d.data.synthetic.findings import CSV_COLUMNS, FINDINGS, LABEL_NAMES
from t3d.data.synthetic.study import PRESETS, Study, sample_study

__all__ = ["CSV_COLUMNS", "FINDINGS", "LABEL_NAMES", "PRESETS", "Study", "generate_dataset", "sample_study"]
