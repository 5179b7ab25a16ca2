"""t3d: text-informed vision-language pre-training on full-resolution 3D medical images."""

__version__ = "0.1.0"
