"""Command-line parsers of the top-level commands ``demo``, ``predict``, ``export`` and ``embed``.

Each ``add_*`` adds one command to ``t3d``'s sub-parsers; the function that runs it is named as ``"module:function"``
and imported only when the command runs (``t3d.cli``), so building these parsers loads no torch.
"""

from __future__ import annotations

from t3d.config import QUICKSTART_CONFIG
from t3d.configfile import add_dataclass_arguments
from t3d.evaluate.request import StudyRequest

PREDICT_SEG_DESCRIPTION = (
    "Label maps for new scans: each study is preprocessed as the network's training data was (orientation, spacing, "
    "HU checks), segmented with Gaussian-blended sliding windows, and its label map is carried back onto the source "
    "image's grid, so OUT/<id>.nii.gz overlays the scan in any viewer; OUT/predictions.jsonl lists the outputs."
)


def add_demo(subparsers) -> None:
    """``t3d demo``."""
    p = subparsers.add_parser("demo")
    p.add_argument("--out", default="demo_out", help="folder for the demo's data, cache and runs")
    p.add_argument("--num-studies", type=int, default=48, help="synthetic studies to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--config", default=str(QUICKSTART_CONFIG), help="pre-training config (default: configs/quickstart.yaml)"
    )
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the config's train.steps)")
    p.add_argument("--finetune-steps", type=int, default=120, help="segmentation fine-tuning steps per run")
    p.add_argument("--preset", default="small", help="synthetic preset: tiny (tests), small (default), default")
    p.set_defaults(func="t3d.demo:command")


def add_predict(subparsers) -> None:
    """``t3d predict seg``."""
    p = subparsers.add_parser("predict")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    s = tasks.add_parser(
        "seg",
        help="segment scans with a `t3d finetune seg` checkpoint; NIfTI label maps on the source grids",
        description=PREDICT_SEG_DESCRIPTION,
    )
    s.add_argument("--checkpoint", required=True, help="fine-tuning run folder or its checkpoints/best.pt")
    s.add_argument("--input", required=True, help="image file / DICOM folder, JSONL/CSV with 'image', or dataset.json")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--sw-batch-size", type=int, default=2, help="sliding windows per forward pass")
    s.add_argument("--overlap", type=float, default=0.5, help="overlap of sliding windows (0..1)")
    s.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    s.set_defaults(func="t3d.predict:seg_command")


def add_export(subparsers) -> None:
    """``t3d export``."""
    p = subparsers.add_parser(
        "export",
        description="Write the encoder weights of a pre-training run as safetensors with the preprocessing spec "
        "(spacing, HU windows, crop size, encoder config) in the metadata.",
    )
    p.add_argument("--checkpoint", required=True, help="pre-training run folder or checkpoint .pt")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.set_defaults(func="t3d.export:command")


def add_embed(subparsers) -> None:
    """``t3d embed``: its study flags come from ``StudyRequest``."""
    p = subparsers.add_parser(
        "embed",
        description="Embed every study of a manifest (JSONL/CSV, CT-RATE layout too) into .npy files + an id index.",
    )
    p.add_argument("--manifest", required=True, help="manifest of the studies (id, image, report/findings/...)")
    p.add_argument("--root", help="folder the manifest's image paths resolve against (default: its folder)")
    add_dataclass_arguments(p, StudyRequest, required=("checkpoint", "out"))
    p.set_defaults(func="t3d.embed:command")
