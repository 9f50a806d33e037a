"""Loading encoder weights from local files without unpickling anything.

safetensors files are read as plain tensors; `.pth`/`.bin`/`.pt` go through
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PipelineError

# Wrappers that training scripts put around a state dict.
_NESTING_KEYS = ("state_dict", "model", "teacher", "model_state_dict")


class EncoderWeightsError(PipelineError):
    """A checkpoint cannot be read or does not fit the encoder; the message lists the keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that weights_only refuses
        raise EncoderWeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    for key in _NESTING_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    # DataParallel / DDP / torch.compile prefixes.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Strictly load `state` into `model`; any mismatch is one error naming the keys.

    `ignore_prefixes`: checkpoint keys of parts the encoder removes on purpose (e.g. a truncated
    ResNet's layer4 and fc), dropped before the strict check.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if wrong_shape:
            parts.append("shape mismatches: " + _preview(
                [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]))
        raise EncoderWeightsError(f"checkpoint {source} does not fit the encoder: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")
