"""Training one fold of a MIL aggregator: AdamW, cross-entropy, early stopping on validation loss.

Optimizer (`optimizer`): "adamw" (default; decoupled weight decay), "adam" (weight decay added to
the gradient as an L2 term: `torch.optim.Adam(weight_decay=reg)`, the recipe of CLAM's and
MambaMIL's `get_optim`) or "radam" (TransMIL's RAdam; its Lookahead wrapper is not reproduced).

One bag per forward pass (bags differ in length); `grad_accumulation` bags per optimizer step.
Class balance:
- class_weights: each bag's loss is scaled by n / (C * n_c) of its class (computed on the training
  bags). The loss is applied per bag, not as a batch-weighted mean, which for one bag per batch
  would cancel the weight. The validation loss is the class-weighted mean, so early stopping
  follows the same objective.
- sampler: each epoch draws len(train) bags with replacement, with probability ∝ 1 / n_c.
- none: plain cross-entropy, each bag once per epoch in a shuffled order.
The model's `aux_loss`, when it returns one, is added to each bag's loss.
Instance-level top-k loss (`instance_loss_weight` > 0; aggregators with instance logits: fmamil,
mean, max): per class, the mean of the `instance_topk` highest instance logits forms a second
slide prediction, and its cross-entropy with the bag label (times the weight) is added. With
lesions of one or two patches it asks the instance CAM itself to single them out, rather than
only the attention-pooled slide logits.
Learning-rate warm-up: with `warmup_epochs` > 0 the rate rises linearly from lr/steps to lr over
the optimizer steps of the first `warmup_epochs` epochs (a rare-positive cohort's first few bags
otherwise push the attention towards whatever they happen to contain), then stays at lr, or
follows `lr_schedule: cosine` (per epoch, to 0 at the last, as PyTorch's CosineAnnealingLR).
Bag augmentation (training passes only; validation, test and every consumer see whole bags in
their order): `instance_dropout` drops that fraction of each bag's instances afresh every pass
(at least one kept), `shuffle_instances` feeds them in a random order (for order-dependent scans).
"""

from __future__ import annotations

import contextlib
import copy
import math
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..devices import resolve_device as _resolve_device
from ..errors import PipelineError
from .bag_source import as_bag_set
from .bags import Bag

log = logging.getLogger("wsi_pipeline")


def resolve_device(device: str) -> torch.device:
    """auto → cuda if available else cpu; asking for cuda without one is a `PipelineError`."""
    return _resolve_device(device, "train.device")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """`torch.use_deterministic_algorithms(enabled)` inside the block, the previous setting after."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    # cuBLAS needs this before its first use to be deterministic (see torch's reproducibility notes).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = previous_benchmark


def class_weights(labels: Sequence[int], n_classes: int) -> np.ndarray:
    """n / (C_present * n_c) per class (mean weight 1 over the bags); 0 for a class with no bags."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


@dataclass
class TrainResult:
    best_epoch: int                 # 1-based epoch whose weights were kept
    best_val_loss: float            # monitored loss at best_epoch (training loss if no validation bags)
    epochs_run: int
    stopped_early: bool
    monitored: str                  # "val_loss" or "train_loss"
    history: list = field(default_factory=list)  # [{"epoch", "train_loss", "val_loss"}]


def _forward(model, bag: Bag, device: torch.device, keep: np.ndarray | None = None):
    features, coords = bag.features, bag.coords
    if keep is not None:
        features, coords = features[keep], coords[keep]
    # Stored dtype (float16 files stay half the bytes) up to the device, float32 from there on.
    features = torch.from_numpy(np.ascontiguousarray(features)).to(device, non_blocking=True).float()[None]  # (1, N, D)
    coords = torch.from_numpy(np.ascontiguousarray(coords)).to(device, dtype=torch.float32)[None]    # (1, N, 2)
    return model(features, coords)


def instance_subset(n_instances: int, drop_fraction: float, shuffle: bool,
                    rng: np.random.Generator) -> np.ndarray | None:
    """Indices of the instances a training pass sees (None: all, in bag order).

    Instance dropout: a random ceil((1 - drop_fraction) * n) of the n instances (at least one) are
    kept, in bag order; shuffle: the kept instances in a random order.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise PipelineError(f"train.instance_dropout must be in [0, 1), got {drop_fraction}")
    if drop_fraction == 0.0 and not shuffle:
        return None
    n_keep = max(1, int(np.ceil((1.0 - drop_fraction) * n_instances)))
    keep = rng.choice(n_instances, size=n_keep, replace=False) if n_keep < n_instances else np.arange(n_instances)
    return rng.permutation(keep) if shuffle else np.sort(keep)


def _bag_loss(out, label: int, device: torch.device, instance_loss_weight: float = 0.0,
              instance_topk: int = 2) -> torch.Tensor:
    target = torch.tensor([label], device=device)
    loss = F.cross_entropy(out.logits.float(), target)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    if instance_loss_weight > 0:
        if out.instance_logits is None:
            raise PipelineError("train.instance_loss_weight > 0 needs an aggregator with instance logits "
                                "(fmamil, mean, max; mambamil / mambamil_3d with model_args "
                                "instance_head: true)")
        il = out.instance_logits.float()                                    # (1, L, C)
        pooled = il.topk(min(instance_topk, il.shape[1]), dim=1).values.mean(dim=1)
        loss = loss + instance_loss_weight * F.cross_entropy(pooled, target)
    return loss


@torch.no_grad()
def evaluate_loss(model, bags, device: torch.device, weights: np.ndarray | None = None) -> float:
    """Mean cross-entropy over `bags` (a sequence of Bag or a BagSet; weighted by class `weights`
    if given), model in eval mode."""
    model.eval()
    total, norm = 0.0, 0.0
    for bag in as_bag_set(bags).iter():
        out = _forward(model, bag, device)
        loss = F.cross_entropy(out.logits.float(), torch.tensor([bag.label], device=device)).item()
        w = 1.0 if weights is None else float(weights[bag.label])
        total += w * loss
        norm += w
    return total / norm if norm > 0 else float("nan")


@torch.no_grad()
def predict_probs(model, bags, device: torch.device) -> np.ndarray:
    """Softmax slide probabilities (n_bags, C) of `bags` (a sequence of Bag or a BagSet), model in
    eval mode."""
    model.eval()
    probs = [torch.softmax(_forward(model, bag, device).logits.float(), dim=-1)[0].cpu().numpy()
             for bag in as_bag_set(bags).iter()]
    return np.stack(probs).astype(np.float64)


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `name` (module docstring) over `params`."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be adamw, adam or radam, got {name!r}")


def lr_factor(step: int, warmup_steps: int, steps_per_epoch: int, epochs: int, schedule: str) -> float:
    """The multiplier of lr at optimizer step ``step`` (0-based): the warm-up ramp times the schedule;
    cosine follows the epoch, as CosineAnnealingLR(T_max=epochs) stepped once per epoch."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))
    return factor


def train_fold(model, train_bags, val_bags, *, n_classes: int,
               lr: float, weight_decay: float, epochs: int, patience: int, balance: str,
               grad_accumulation: int, seed: int, device: torch.device, progress: bool = False,
               desc: str = "train", warmup_epochs: int = 0, instance_loss_weight: float = 0.0,
               instance_topk: int = 2, min_delta: float = 0.0, instance_dropout: float = 0.0,
               shuffle_instances: bool = False, optimizer: str = "adamw", min_epochs: int = 0,
               lr_schedule: str = "constant") -> TrainResult:
    """Fit `model` in place; on return it holds the best epoch's weights and is in eval mode.

    `train_bags` / `val_bags`: sequences of `Bag` or `BagSet`s (bags read from disk per step,
    training/bag_source.py); the same bags in the same order give the same result either way.

    Early stopping: after each epoch the validation loss is computed; the weights of the best epoch
    are kept, and training stops after `patience` epochs without an improvement of more than
    `min_delta` (absolute) over the loss that last reset the count. A validation loss creeping
    towards 0 by 1e-4 per epoch then no longer runs training to the epoch cap. Without validation
    bags the training loss is monitored instead (a warning says so). It never stops before epoch
    `min_epochs` (CLAM's and MambaMIL's `stop_epoch`), though the patience count runs from epoch 1.
    """
    train_bags, val_bags = as_bag_set(train_bags), as_bag_set(val_bags)
    if not len(train_bags):
        raise PipelineError(f"{desc}: no training bags")
    model.to(device)
    labels = train_bags.labels
    weights = class_weights(labels, n_classes)
    loss_weights = weights if balance == "class_weights" else np.ones(n_classes)
    val_weights = weights if balance == "class_weights" else None
    if not len(val_bags):
        log.warning("%s: no validation bags; early stopping monitors the training loss", desc)
    optimizer = build_optimizer(optimizer, model.parameters(), lr, weight_decay)
    steps_per_epoch = -(-len(train_bags) // grad_accumulation)
    warmup_steps = max(0, warmup_epochs) * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, steps_per_epoch, epochs, lr_schedule))
    rng = np.random.default_rng(seed)
    sample_p = weights[labels] / weights[labels].sum()

    best_loss, best_epoch, best_state = float("inf"), 0, None
    reference_loss = float("inf")
    history, since_best, stopped_early = [], 0, False
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False, disable=not progress,
               dynamic_ncols=True)
    for epoch in bar:
        model.train()
        if balance == "sampler":
            order = rng.choice(len(train_bags), size=len(train_bags), replace=True, p=sample_p)
        else:
            order = rng.permutation(len(train_bags))
        optimizer.zero_grad(set_to_none=True)
        epoch_loss = 0.0
        # closing: a failing step stops the reader thread at once, not when the traceback goes
        with contextlib.closing(train_bags.iter(order)) as epoch_bags:
            for step, bag in enumerate(epoch_bags):
                group_start = step - step % grad_accumulation
                group_size = min(grad_accumulation, len(order) - group_start)
                keep = instance_subset(len(bag.features), instance_dropout, shuffle_instances, rng)
                loss = _bag_loss(_forward(model, bag, device, keep), bag.label, device, instance_loss_weight,
                                 instance_topk) * float(loss_weights[bag.label])
                if not torch.isfinite(loss):
                    raise PipelineError(f"{desc}: non-finite training loss at epoch {epoch} (slide "
                                        f"{bag.slide_id!r}); lower train.lr or check the features")
                (loss / group_size).backward()
                epoch_loss += loss.item()
                if step - group_start + 1 == group_size:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        train_loss = epoch_loss / len(order)
        val_loss = evaluate_loss(model, val_bags, device, val_weights) if len(val_bags) else None
        monitored = val_loss if len(val_bags) else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(train=f"{train_loss:.4f}", val="-" if val_loss is None else f"{val_loss:.4f}")
        if monitored < best_loss:
            best_loss, best_epoch = monitored, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if monitored < reference_loss - min_delta:
            reference_loss, since_best = monitored, 0
        else:
            since_best += 1
            if since_best >= patience and epoch >= min_epochs:
                stopped_early = epoch < epochs
                break
    bar.close()
    if best_state is None:  # every monitored loss was NaN (e.g. degenerate validation set)
        raise PipelineError(f"{desc}: the monitored loss was never finite; check the validation slides")
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch=best_epoch, best_val_loss=float(best_loss), epochs_run=len(history),
                       stopped_early=stopped_early, monitored="val_loss" if len(val_bags) else "train_loss",
                       history=history)
