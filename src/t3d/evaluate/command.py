"""``t3d evaluate zeroshot|retrieval``: joint-space evaluation of a pre-training checkpoint (docs/method.md §6).

t3d evaluate zeroshot --checkpoint runs/pretrain --data findings.csv [--splits splits.json --split test]
    [--prompts prompts.yaml] [--images DIR] [--out runs/eval/zeroshot]
t3d evaluate retrieval --checkpoint runs/pretrain --manifest heldout.jsonl [--splits splits.json --split test]
    [--root DIR] [--out runs/eval/retrieval]
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="zero-shot classification and image-report retrieval of a checkpoint")
    sub = p.add_subparsers(dest="evaluation", metavar="EVALUATION")
    sub.required = True
    z = sub.add_parser("zeroshot", help="zero-shot finding classification with prompt pairs")
    z.add_argument("--data", required=True, help="findings CSV (CT-RATE multi_abnormality_labels layout)")
    z.add_argument("--images", help="folder the CSV's VolumeName/image entries resolve against")
    z.add_argument("--prompts", help="YAML of prompt templates / names / per-finding prompts (see zeroshot.py)")
    z.add_argument("--out", default="runs/eval/zeroshot", help="output folder (default runs/eval/zeroshot)")
    z.set_defaults(func=_zeroshot)
    r = sub.add_parser("retrieval", help="image <-> report Recall@1/5/10 on held-out studies")
    r.add_argument("--manifest", required=True, help="held-out manifest with reports (JSONL/CSV, CT-RATE layout)")
    r.add_argument("--root", help="folder the manifest's image paths resolve against (default: its folder)")
    r.add_argument("--out", default="runs/eval/retrieval", help="output folder (default runs/eval/retrieval)")
    r.set_defaults(func=_retrieval)
    for q in (z, r):
        q.add_argument("--checkpoint", required=True, help="pre-training checkpoint (.pt file or run folder)")
        q.add_argument("--splits", help="JSON split file; evaluate only --split of it")
        q.add_argument("--split", default="test", help="split of --splits to evaluate (default test)")
        q.add_argument("--cache", help="preprocessed cache to write/reuse (default OUT/cache)")
        q.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for 95%% intervals")
        q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        q.add_argument("--max-crops", type=int, default=27, help="grid crops per study at most (default 27)")
        q.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring grid crops")
        q.add_argument("--crop-batch", type=int, default=8, help="crops per forward pass")
        q.add_argument("--workers", type=int, default=2, help="preprocessing / loading processes")
        q.add_argument("--text-model", help="local copy of the checkpoint's text encoder, if its path moved")
    z.add_argument("--stratified", action="store_true", help="stratified bootstrap (rarest positive finding)")


def _common(args: argparse.Namespace) -> dict:
    return {
        "splits": args.splits,
        "split": args.split,
        "cache": args.cache,
        "n_boot": args.n_boot,
        "seed": args.seed,
        "overlap": args.overlap,
        "max_crops": args.max_crops,
        "crop_batch": args.crop_batch,
        "workers": args.workers,
        "text_model": args.text_model,
    }


def _zeroshot(args: argparse.Namespace) -> int:
    from t3d.evaluate.zeroshot import run_zeroshot

    result = run_zeroshot(
        args.checkpoint, args.data, args.out, images=args.images, prompts=args.prompts,
        stratified=args.stratified, **_common(args),
    )  # fmt: skip
    macro = result["test"]["macro"]["auroc"]
    print(
        f"evaluate zeroshot [{result['method']}] macro AUROC {macro['value']:.3f} [{macro['low']:.3f}, "
        f"{macro['high']:.3f}] over {result['test']['n_studies']} studies -> {args.out}"
    )
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from t3d.evaluate.retrieval import run_retrieval

    result = run_retrieval(args.checkpoint, args.manifest, args.out, root=args.root, **_common(args))
    for name in ("image_to_report", "report_to_image"):
        recalls = "  ".join(f"{k}={v['value']:.3f}" for k, v in result[name].items())
        print(f"{name.replace('_', ' ')}: {recalls}")
    print("chance: " + "  ".join(f"{k}={v:.3f}" for k, v in result["chance"].items()), f"(N={result['n_studies']})")
    return 0
