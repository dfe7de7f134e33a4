"""Fracast-0 split where tasks can share it: the input normalisation, the encoder trunk, the forecast head.

The package ``fracast`` ships the weights (fp32 and int8 "w8" safetensors) and
``FracastModel``, whose ``forecast_batch`` is the reference. Its network is
``core`` (input projection, one convolution block reused at ten dilations,
final RMSNorm: ``[B, 2048]`` -> hidden states ``[B, 2048, 64]``) followed by
``head`` (a gather/quantile decoder: hidden states + the normalised context ->
``[B, 48, 9]`` quantiles). The trunk's block is *shared across its stages*, so
a fine-tune that touches it changes every stage; the natural place for tasks to
differ is therefore the head, and the shared pass stops at the trunk's output.

:func:`normalise` is ``FracastModel._predict_rows``' preprocessing, row by row
(rows here have their own lengths): the last ``W`` observations, min/max
scaling in float64 over the finite ones, left-padded with zeros and a
``valid=False`` mask; non-finite values inside are masked as missing.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fmplex import weight_cache

BACKBONE = "fm.fracast"
PACKAGE = "fracast"
WEIGHT_FORMATS = ("fp32", "w8")
WEIGHT_FILES = {"fp32": ("model.safetensors",), "w8": ("model.int8.safetensors", "w8_manifest.json")}
MIN_FINITE = 8  # fracast refuses a context with fewer finite observations
EMBEDDING = 128  # [mean of the hidden states, last hidden state], what the head summarises


def weights_dir() -> Path:
    """The ``weights/`` folder inside the installed package (found without importing it)."""
    return weight_cache.require_package_file(PACKAGE, "weights/config.json", BACKBONE, "fracast").parent


@functools.cache
def fingerprint(weights: str = "fp32") -> str:
    """Content hash of the config and the weight files of one format: a manifest names what it was made for."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    root = weights_dir()
    return weight_cache.content_fingerprint(*(root / name for name in ("config.json", *WEIGHT_FILES[weights])), salt=weights.encode())


def reference_model(weights: str = "fp32", device: str = "cpu") -> Any:
    """``fracast.FracastModel`` from the packaged weights (no download: the bundled folder is passed)."""
    from fracast import FracastModel  # noqa: PLC0415

    return FracastModel.from_pretrained(str(weights_dir()), weights=weights, device=device)


def base_state(weights: str = "fp32") -> dict[str, torch.Tensor]:
    """The full state dict (``core.*``, ``head.*``) of one weight format, as fracast loads it."""
    model = reference_model(weights)
    return {**{f"core.{k}": v for k, v in model.core.state_dict().items()},
            **{f"head.{k}": v for k, v in model.head.state_dict().items()}}


@dataclasses.dataclass
class Normalised:
    """Rows in the model's space: ``values``/``valid`` ``[B, W]``, ``loc``/``span`` ``[B, 1]`` (float64)."""

    values: np.ndarray
    valid: np.ndarray
    loc: np.ndarray
    span: np.ndarray


def normalise(rows: Sequence[np.ndarray], width: int) -> Normalised:
    """``_predict_rows``' preprocessing for rows of any lengths (each already checked: >= 8 finite in its tail)."""
    n = len(rows)
    values = np.zeros((n, width), dtype=np.float32)
    valid = np.zeros((n, width), dtype=bool)
    loc = np.zeros((n, 1), dtype=np.float64)
    span = np.ones((n, 1), dtype=np.float64)
    for i, row in enumerate(rows):
        tail = np.asarray(row[-width:], dtype=np.float32)
        mask = np.isfinite(tail)
        finite = np.where(mask, tail, np.float32(np.nan))
        lo = np.nanmin(finite).astype(np.float64)
        sp = np.maximum(np.nanmax(finite) - lo, 1e-5).astype(np.float64)
        start = width - tail.shape[0]
        # float64 as fracast's own (its loc/span are arrays); a float64 *scalar* would leave numpy 1.x
        # computing in float32, which overflows for values near the float32 limit
        values[i, start:] = np.where(mask, (tail.astype(np.float64) - lo) / sp, 0.0).astype(np.float32)
        valid[i, start:] = mask
        loc[i, 0], span[i, 0] = lo, sp
    return Normalised(values, valid, loc, span)


class Backbone:
    """The packaged network, run in two parts: :meth:`trunk` (shared) and :meth:`quantiles` (per head)."""

    def __init__(self, weights: str = "fp32", device: str = "cpu") -> None:
        self.weights = weights
        self.device = torch.device(device)
        ref = reference_model(weights, device)
        self.core = ref.core.eval()
        self.head = ref.head.eval()
        self.width = int(ref.context_length)
        self.native_horizon = int(ref.horizon)
        self.quantiles = tuple(float(q) for q in ref.quantiles)
        self.median_index = int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))
        self.fingerprint = fingerprint(weights)

    def tensors(self, norm: Normalised) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(norm.values).to(self.device), torch.from_numpy(norm.valid).to(self.device))

    def trunk(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, W]`` normalised values and mask -> hidden states ``[B, W, 64]`` (the shared pass)."""
        return self.core(values[:, None, :], valid[:, None, :], valid[:, None, :].to(torch.float32))

    @staticmethod
    def quantiles_of(head: torch.nn.Module, hidden: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """A forecast head on the trunk's output: ``[B, 48, 9]`` quantiles in the normalised space."""
        return head.forward_horizon(hidden, last_obs=values[:, -1:], ctx=values, ctx_mask=valid)

    @staticmethod
    def embedding(hidden: torch.Tensor) -> torch.Tensor:
        """The series embedding ``[B, 128]``: the summary the forecast head reads (mean and last hidden state)."""
        return torch.cat([hidden.mean(dim=1), hidden[:, -1]], dim=-1)
