"""Report text (docs/method.md §2): cleaning and sentences, the frozen encoder, and cached centred features."""

from t3d.text.encoder import MINILM_ID, FrozenTextEncoder, resolve_text_model
from t3d.text.features import TextFeatures, load_text_features
from t3d.text.reports import clean_report, report_hash, split_sections, split_sentences

__all__ = [
    "MINILM_ID",
    "FrozenTextEncoder",
    "TextFeatures",
    "clean_report",
    "load_text_features",
    "report_hash",
    "resolve_text_model",
    "split_sections",
    "split_sentences",
]
