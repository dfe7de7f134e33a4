"""The ``lora`` kind: low-rank deltas on the pointwise (1x1) convolutions, applied to the task's rows only.

A 1x1 convolution is a linear map of the channels at every pixel, so LoRA
applies to it exactly as to a Linear: ``y = W x + scale * B (A x)``, with
``A [r, in]`` and ``B [out, r]`` (PEFT's ``lora_A``/``lora_B`` 1x1 conv
weights, squeezed). The delta is added to the convolution's output before
its batch norm, as PEFT's wrapped ``Conv2d`` does. The artifact holds
``lora.<block>.<expand|project>.A`` / ``.B`` and ``manifest["lora"]["scale"]``
(``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA); a head (``head.weight``,
``head.bias``: a classifier trained with the adapter) is optional.

The rows of other tasks in the same batch go through the shared convolution
untouched: the delta is computed on this task's rows and added to them alone.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from fmplex.artifacts import ArtifactError

from .model import N_BLOCKS, block_has_expand, pointwise_conv, skeleton
from .tasks import VisionTask

KEY = re.compile(r"^lora\.(\d+)\.(expand|project)\.(A|B)$")


def pointwise_shape(block: int, which: str) -> tuple[int, int] | None:
    """(out, in) channels of a block's 1x1 convolution (None: the block has no such convolution)."""
    b = skeleton()._blocks[block]
    if which == "expand" and not block_has_expand(b):
        return None
    w = pointwise_conv(b, which).weight
    return int(w.shape[0]), int(w.shape[1])


class LoraTask(VisionTask):
    kind = "lora"

    def load_body(self, tensors: dict[str, torch.Tensor]) -> None:
        lora = self.manifest.get("lora") or {}
        scale = lora.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ArtifactError(f"{self.where}: manifest lora.scale must be a finite number, got {scale!r}")
        self.scale = float(scale)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if not key.startswith("lora."):
                continue
            m = KEY.match(key)
            if m is None or not 0 <= int(m.group(1)) < N_BLOCKS:
                raise ArtifactError(f"{self.where}: tensor '{key}' is not lora.<block 0..{N_BLOCKS - 1}>.<expand|project>.<A|B>")
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
        if not pairs:
            raise ArtifactError(f"{self.where}: a lora task has no lora.* tensors")
        self.deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for (block, which), ab in sorted(pairs.items()):
            shape = pointwise_shape(block, which)
            name = f"lora.{block}.{which}"
            if shape is None:
                raise ArtifactError(f"{self.where}: block {block} has no {which} convolution ({name})")
            if set(ab) != {"A", "B"}:
                raise ArtifactError(f"{self.where}: {name} needs both .A and .B")
            a, b = ab["A"], ab["B"]
            out_ch, in_ch = shape
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_ch or b.shape[0] != out_ch or a.shape[0] != b.shape[1]:
                raise ArtifactError(
                    f"{self.where}: {name} has A {list(a.shape)}, B {list(b.shape)}; expected A [r, {in_ch}], B [{out_ch}, r]"
                )
            if not (a.is_floating_point() and b.is_floating_point()) or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ArtifactError(f"{self.where}: {name} must be finite float tensors")
            self.deltas[(block, which)] = (a.float()[:, :, None, None].contiguous(), b.float()[:, :, None, None].contiguous())
        self.lora_blocks = frozenset(block for block, _ in self.deltas)
        self.body_bytes = sum((a.numel() + b.numel()) * 4 for a, b in self.deltas.values())

    def pointwise_delta(self, block: int, which: str, x_in: torch.Tensor) -> torch.Tensor | None:
        ab = self.deltas.get((block, which))
        if ab is None:
            return None
        a, b = ab
        return F.conv2d(F.conv2d(x_in, a), b) * self.scale

    @property
    def nbytes(self) -> int:
        return self.body_bytes + self.head.nbytes


__all__ = ["LoraTask", "pointwise_shape"]
