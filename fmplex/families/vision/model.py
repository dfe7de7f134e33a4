"""The EfficientNet-Lite0 network, from ``efficientnet-lite-pytorch``, cut into stages.

The package's ``EfficientNet.from_name("efficientnet-lite0")`` builds the
network (ReLU6, no squeeze-excitation, TensorFlow "same" padding fixed for
224x224 inputs) and takes the weights' state dict unchanged (all 296 keys
match). fmplex uses it as it is; it only addresses it in *stages*, so that
tasks can fork above one and so that rows of LoRA tasks get their own deltas
inside a shared block:

- the stem (``_conv_stem`` + ``_bn0`` + ReLU6): always shared;
- stages ``0..15``: the 16 MBConv blocks (``_blocks.<j>``);
- stage ``16``: the head convolution (``_conv_head`` + ``_bn1`` + ReLU6), 1280 channels;
- then global average pooling gives the pooled features ``[rows, 1280]``
  (what ``embedding`` returns and every head reads); the package's ImageNet
  ``_fc`` is not part of the shared pass.

:func:`run_block` is the MBConv forward written out, with a hook on the two
pointwise (1x1) convolutions; it is checked against the package's own block
forward in the tests (bit-equal without a hook).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .weights import MODEL_NAME, load_state_dict

IMAGE_SIZE = 224
FEATURES = 1280
N_BLOCKS = 16
HEAD_STAGE = N_BLOCKS  # stage index of the head convolution
N_STAGES = N_BLOCKS + 1  # a fork point lies in [0, N_STAGES]; N_STAGES = only the head is the task's
POINTWISE = ("expand", "project")  # the 1x1 convolutions of a block (block 0 has no expand)

# delta(block, which, x_in, y) -> what to add to y = conv1x1(x_in) for some rows (None: nothing).
PointwiseHook = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]


def build_model(state: dict[str, Any] | None = None) -> Any:
    """The package's EfficientNet-Lite0 with ``state`` (default: the ImageNet weights), eval, frozen."""
    from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415

    model = EfficientNet.from_name(MODEL_NAME)
    model.load_state_dict(load_state_dict() if state is None else state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=1)
def skeleton() -> Any:
    """An EfficientNet-Lite0 with random weights: the stage modules forks copy and LoRA checks its shapes against."""
    from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415

    model = EfficientNet.from_name(MODEL_NAME)
    model.eval()
    model.requires_grad_(False)
    return model


def stem(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model._swish(model._bn0(model._conv_stem(x)))


def head_conv(conv: Any, bn: Any, act: Any, x: torch.Tensor) -> torch.Tensor:
    return act(bn(conv(x)))


def pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: ``[rows, C, H, W] -> [rows, C]`` (the package's ``_avg_pooling``)."""
    return x.mean(dim=(2, 3))


def block_has_expand(block: Any) -> bool:
    return block._block_args.expand_ratio != 1


def pointwise_conv(block: Any, which: str) -> Any:
    return block._expand_conv if which == "expand" else block._project_conv


def run_block(block: Any, index: int, x: torch.Tensor, hook: PointwiseHook | None = None) -> torch.Tensor:
    """One MBConv block in eval mode (drop-connect is off outside training), with
    ``hook`` adding row deltas to the outputs of its pointwise convolutions."""
    inputs = x
    if block_has_expand(block):
        y = block._expand_conv(x)
        if hook is not None:
            y = hook(index, "expand", x, y)
        x = block._swish(block._bn0(y))
    x = block._swish(block._bn1(block._depthwise_conv(x)))
    if block.has_se:  # not in the Lite models; kept so that the forward is the package's
        s = block._se_expand(block._swish(block._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(s) * x
    y = block._project_conv(x)
    if hook is not None:
        y = hook(index, "project", x, y)
    x = block._bn2(y)
    args = block._block_args
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = x + inputs
    return x


def run_stage(model: Any, stage: int, x: torch.Tensor, hook: PointwiseHook | None = None) -> torch.Tensor:
    """Shared stage ``stage`` of ``model`` (a block, or the head convolution)."""
    if stage < N_BLOCKS:
        return run_block(model._blocks[stage], stage, x, hook)
    return head_conv(model._conv_head, model._bn1, model._swish, x)


def features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[rows, 1280]`` of normalised pixels ``[rows, 3, 224, 224]`` (no hook)."""
    x = stem(model, pixels)
    for s in range(N_STAGES):
        x = run_stage(model, s, x)
    return pool(x)


def stage_prefixes() -> list[str]:
    """State-dict prefix of each stage (index = stage), e.g. ``_blocks.3.``."""
    return [f"_blocks.{j}." for j in range(N_BLOCKS)] + ["_conv_head.", "_bn1."]


STEM_PREFIXES = ("_conv_stem.", "_bn0.")
FC_PREFIX = "_fc."


def stage_of(key: str) -> int | None:
    """The stage a state-dict key belongs to (None: the stem or the classifier)."""
    if key.startswith("_blocks."):
        return int(key.split(".", 2)[1])
    if key.startswith(("_conv_head.", "_bn1.")):
        return HEAD_STAGE
    return None


def plain_pointwise(model: Any) -> Any:
    """Replace every block's 1x1 convolutions by plain ``torch.nn.Conv2d`` with the same weights, in place.

    The package's convolutions are a subclass that needs the image size to be
    constructed, which PEFT cannot do when it wraps one; a 1x1, stride-1
    convolution has no padding, so the plain one computes the same. Call this
    before ``peft.get_peft_model`` to fine-tune a LoRA task for ``fm.efficientnet``.
    """
    for block in model._blocks:
        for which in POINTWISE:
            if which == "expand" and not block_has_expand(block):
                continue
            old = pointwise_conv(block, which)
            new = torch.nn.Conv2d(old.in_channels, old.out_channels, 1, bias=old.bias is not None)
            new.weight = old.weight
            if old.bias is not None:
                new.bias = old.bias
            setattr(block, "_expand_conv" if which == "expand" else "_project_conv", new)
    return model
