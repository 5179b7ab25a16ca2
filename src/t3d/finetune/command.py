"""``t3d finetune {seg,cls}``: downstream fine-tuning commands (docs/method.md §6).

The parsers live here; each task runs as ``t3d.finetune.seg.command`` / ``t3d.finetune.cls.command``, imported
when it runs, so ``t3d finetune seg --help`` loads no torch.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        description="Downstream fine-tuning from a pre-training checkpoint, or from random initialisation.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    add_seg(tasks)
    add_cls(tasks)


def add_seg(subparsers) -> None:
    """Register ``seg`` under ``t3d finetune``."""
    p = subparsers.add_parser(
        "seg",
        help="fine-tune SwinUNETR / encoder-UNet segmentation on an MSD-layout dataset",
        description="Segmentation fine-tuning (docs/method.md §6). Any SegConfig field can be overridden: --lr 3e-4, "
        "'--crop_size=[64,64,64]', --model.preset base (random init only).",
    )
    p.add_argument("--data", help="MSD dataset.json (training [{image,label}], labels)")
    p.add_argument("--init", help="pre-training run folder / .pt / exported .safetensors, or 'random'")
    p.add_argument("--fraction", type=float, help="share of labelled training studies (e.g. 0.01, 0.1, 1)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--config", help="YAML with SegConfig fields")
    p.add_argument("--freeze-encoder", action="store_true", default=None, help="train the decoder only")
    p.set_defaults(func="t3d.finetune.seg:command", accepts_overrides=True)


def add_cls(subparsers) -> None:
    """Register ``cls`` under ``t3d finetune``."""
    p = subparsers.add_parser(
        "cls",
        help="classify findings: linear probe or fine-tune of a pre-trained encoder",
        description="Multi-label classification (docs/method.md §6). Any ClsConfig field can be overridden: "
        "--steps 100.",
    )
    p.add_argument("--data", help="findings CSV (CT-RATE multi_abnormality_labels layout: VolumeName + 0/1 columns)")
    p.add_argument("--init", help="pre-training checkpoint (.pt or run folder), or 'random'")
    p.add_argument("--probe", action="store_true", help="freeze the encoder: linear probe on cached features")
    p.add_argument("--fraction", type=float, help="label fraction of the training studies to use (0, 1]")
    p.add_argument("--images", help="folder the CSV's VolumeName/image entries resolve against")
    p.add_argument("--splits", help='split file {"finetune": [...], "test": [...]}; default a seeded split')
    p.add_argument("--out", help="run folder (default runs/cls)")
    p.add_argument("--seed", type=int, help="seed of splits, label fraction, sampling and bootstrap")
    p.add_argument("--config", help="YAML ClsConfig; flags and --section.key overrides win over it")
    p.set_defaults(func="t3d.finetune.cls:command", accepts_overrides=True)
