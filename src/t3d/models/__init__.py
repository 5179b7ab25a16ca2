"""Image encoders, projection heads and the text-conditioned restoration decoder (docs/method.md §3)."""

from t3d.models.encoders import PRESETS, Encoder, ResNetEncoder, SwinEncoder, build_encoder, check_crop_size
from t3d.models.heads import CellFindingHead, LogitScale, ProjectionHead, StudyHead
from t3d.models.pooling import TilePooling
from t3d.models.restoration import RestorationDecoder

__all__ = [
    "CellFindingHead",
    "PRESETS",
    "Encoder",
    "LogitScale",
    "ProjectionHead",
    "ResNetEncoder",
    "RestorationDecoder",
    "StudyHead",
    "SwinEncoder",
    "TilePooling",
    "build_encoder",
    "check_crop_size",
]
