"""``t3d evaluate zeroshot|retrieval``: joint-space evaluation of a pre-training checkpoint (docs/method.md §6).

t3d evaluate zeroshot --checkpoint runs/pretrain --data findings.csv [--splits splits.json --split test]
    [--prompts prompts.yaml] [--images DIR] [--out runs/eval/zeroshot]
t3d evaluate retrieval --checkpoint runs/pretrain --manifest heldout.jsonl [--splits splits.json --split test]
    [--root DIR] [--out runs/eval/retrieval]

The flags shared with ``t3d embed`` come from ``StudyRequest``. The commands are named by ``module:function`` and
imported only when they run, so ``t3d evaluate --help`` loads no torch.
"""

from __future__ import annotations

from t3d.configfile import add_dataclass_arguments
from t3d.evaluate.request import StudyRequest


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate")
    sub = p.add_subparsers(dest="evaluation", metavar="EVALUATION")
    sub.required = True
    z = sub.add_parser("zeroshot", help="zero-shot finding classification with prompt pairs")
    z.add_argument("--data", required=True, help="findings CSV (CT-RATE multi_abnormality_labels layout)")
    z.add_argument("--images", help="folder the CSV's VolumeName/image entries resolve against")
    z.add_argument("--prompts", help="YAML of prompt templates / names / per-finding prompts (see zeroshot.py)")
    z.add_argument("--stratified", action="store_true", help="stratified bootstrap (rarest positive finding)")
    z.set_defaults(func="t3d.evaluate.zeroshot:command")
    r = sub.add_parser("retrieval", help="image <-> report Recall@1/5/10 on held-out studies")
    r.add_argument("--manifest", required=True, help="held-out manifest with reports (JSONL/CSV, CT-RATE layout)")
    r.add_argument("--root", help="folder the manifest's image paths resolve against (default: its folder)")
    r.set_defaults(func="t3d.evaluate.retrieval:command")
    for q, name in ((z, "zeroshot"), (r, "retrieval")):
        add_dataclass_arguments(q, StudyRequest, required=("checkpoint",), defaults={"out": f"runs/eval/{name}"})
        q.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for 95%% intervals")
        q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
