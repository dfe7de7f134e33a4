"""Fine-tuning Fracast-0's forecast head on one's own series, the trunk frozen (control plane).

Writes a full state dict in fracast's layout (``core.*`` unchanged,
``head.*`` tuned) as safetensors: the source a ``fork`` task is built from
(only the head tensors that changed are kept in the task). The trunk is frozen
because it is what every task shares; a state dict that changes it would be
refused by the importer (see :mod:`.importers`).

Training windows are cut from the given series: a context of 64-512 steps,
then the next 48 steps as the target, both in the context's own normalised
space (as the model sees them); the loss is the mean pinball loss over the
nine quantiles, optimised with Adam. The trunk runs once over all windows.

``python -m fmplex.families.timeseries.finetune --series co2 --out head.safetensors``
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .model import Backbone, normalise

Echo = Callable[[str], None]


def training_windows(series: Sequence[np.ndarray], windows: int, horizon: int, seed: int = 0,
                     context: tuple[int, int] = (64, 512)) -> tuple[list[np.ndarray], np.ndarray]:
    """(contexts, targets [windows, horizon]) cut at random from ``series`` (targets fully observed)."""
    rng = np.random.default_rng(seed)
    usable = [s for s in series if len(s) >= context[0] + horizon]
    if not usable:
        raise ValueError(f"no series is long enough: a window needs {context[0] + horizon} steps")
    contexts, targets = [], []
    tries = 0
    while len(contexts) < windows:
        tries += 1
        if tries > 100 * windows:
            raise ValueError("too few fully observed targets in these series")
        s = usable[int(rng.integers(len(usable)))]
        n = int(rng.integers(context[0], min(context[1], len(s) - horizon) + 1))
        start = int(rng.integers(0, len(s) - n - horizon + 1))
        target = s[start + n : start + n + horizon]
        if not np.isfinite(target).all() or np.isfinite(s[start : start + n]).sum() < 8:
            continue
        contexts.append(np.asarray(s[start : start + n], dtype=np.float32))
        targets.append(target)
    return contexts, np.stack(targets).astype(np.float32)


def pinball(pred: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean quantile loss of ``pred [N, H, Q]`` against ``target [N, H]``."""
    diff = target.unsqueeze(-1) - pred
    return torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean()


def finetune_head(series: Sequence[np.ndarray], steps: int = 40, windows: int = 32, lr: float = 1e-3, seed: int = 0,
                  echo: Echo = print, backbone: Backbone | None = None) -> dict[str, torch.Tensor]:
    """The full state dict (``core.*`` as packaged, ``head.*`` tuned on ``series``)."""
    torch.manual_seed(seed)
    bb = backbone or Backbone("fp32")
    contexts, targets = training_windows(series, windows, bb.native_horizon, seed)
    norm = normalise(contexts, bb.width)
    values, valid = bb.tensors(norm)
    with torch.no_grad():
        hidden = bb.trunk(values, valid)
    target = torch.from_numpy(((targets - norm.loc) / norm.span).astype(np.float32)).to(bb.device)
    qs = torch.tensor(bb.quantiles, dtype=torch.float32, device=bb.device)
    head = copy.deepcopy(bb.head)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.no_grad():
        first = float(pinball(bb.quantiles_of(head, hidden, values, valid), target, qs))
    for _ in range(steps):
        opt.zero_grad()
        loss = pinball(bb.quantiles_of(head, hidden, values, valid), target, qs)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(pinball(bb.quantiles_of(head, hidden, values, valid), target, qs))
    echo(f"fine-tuned the head on {windows} windows, {steps} Adam steps: pinball loss {first:.4f} -> {last:.4f}")
    return {**{f"core.{k}": v.detach().clone() for k, v in bb.core.state_dict().items()},
            **{f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}}


def main() -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    from . import demo_data  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Fine-tune Fracast-0's head on bundled series; write a fork's source.")
    parser.add_argument("--series", default="co2", help=f"comma-separated, of {', '.join(demo_data.NAMES)} (default co2)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps (default 40)")
    parser.add_argument("--windows", type=int, default=32, help="training windows (default 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = finetune_head([demo_data.series(n.strip()) for n in args.series.split(",")], args.steps, args.windows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
