"""Loading encoder weights from what users have, offline, without unpickling anything.

A checkpoint is a single file (``.safetensors``; ``.pth``/``.bin``/``.pt``/``.torch`` through
``torch.load(..., weights_only=True)``) or an untouched model-hub snapshot folder (``config.json``
+ ``model.safetensors`` / ``pytorch_model.bin`` / a sharded ``*.index.json``). On the way to a
strict load the release layouts are undone:

- nestings: ``state_dict``, ``model``, ``teacher``, ``module``, ``model_state_dict``, ...;
- prefixes (``module.``, ``_orig_mod.``, ``trunk.``, ``backbone.``, ``visual.``, ``model.``,
  ``encoder.``): removed, or the subset under them kept, whichever fits the model's keys best;
- DINOv2 training layouts: chunked blocks ``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``, ``mask_token``
  and heads (``dino_head.``, ``ibot_head.``) dropped, DINOv2-native names (``register_tokens``,
  ``mlp.w12``/``mlp.w3``, class-token position in ``pos_embed``) -> timm's.

A file that does not fit the encoder is one :class:`EncoderWeightsError` that names the file,
the registered encoders its tensor shapes fit, and the config line to use
(:func:`identify_checkpoint` compares key/shape sets against every registered entry built on the
meta device).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..errors import PipelineError

# Wrappers that training scripts put around a state dict (checked in this order, repeatedly).
_NESTING_KEYS = ("state_dict", "model", "teacher", "model_state_dict", "module", "network", "net")
# Prefixes the releases put in front of the encoder's own keys.
_PREFIXES = ("module.", "_orig_mod.", "trunk.", "backbone.", "visual.", "model.", "encoder.")
# Training-only parts of DINO/DINOv2/iBOT checkpoints (teacher/student heads) and the mask token.
_TRAINING_ONLY = ("dino_head.", "ibot_head.", "mask_token")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".torch", ".ckpt")
# Files of a hub snapshot, best first (what transformers / timm write).
_SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

Shapes = Mapping[str, tuple[int, ...]]


class EncoderWeightsError(PipelineError):
    """A checkpoint cannot be read or does not fit the encoder; the message says what to do."""


# -- reading -------------------------------------------------------------------------------------

def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight file(s) ``path`` stands for: itself, or the weights of a snapshot folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EncoderWeightsError(f"checkpoint not found: {path}")
    for index in _SHARD_INDEXES:
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise EncoderWeightsError(f"checkpoint folder {path}: {index} is not a shard index "
                                          f"({type(exc).__name__}: {exc})") from None
            shards = sorted(set(weight_map.values()))
            if any("/" in s or "\\" in s or s.startswith(".") for s in shards):
                raise EncoderWeightsError(f"checkpoint folder {path}: {index} names shards outside the folder")
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise EncoderWeightsError(f"checkpoint folder {path}: shards listed in {index} are missing: "
                                          + ", ".join(missing))
            return [path / s for s in shards]
    for name in _SNAPSHOT_FILES:
        if (path / name).is_file():
            return [path / name]
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if len(candidates) == 1:
        return candidates
    found = ", ".join(p.name for p in candidates) or "none"
    raise EncoderWeightsError(
        f"checkpoint folder {path}: no model.safetensors, pytorch_model.bin or shard index, and "
        f"{'several' if candidates else 'no'} weight files ({found}); pass the weights file itself")


def _refusal(path: Path, exc: Exception) -> EncoderWeightsError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch names the object it refused after "WeightsUnpickler error:" (same or next line).
    reason = ""
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or " ".join(lines[i + 1:i + 2])
            break
    reason = (reason or (lines[-1] if lines else type(exc).__name__)).split(". ")[0][:200]
    return EncoderWeightsError(
        f"cannot read checkpoint {path}: it holds pickled Python objects besides tensors, and loading it "
        f"would run code from the file, so torch.load(weights_only=True) refuses it ({reason}). On a "
        f"machine where you trust the file, re-save its tensors as safetensors and pass that file: "
        f"python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=False); "
        f"sd = next((sd[k] for k in ('state_dict', 'model', 'teacher') if k in sd), sd) "
        f"if isinstance(sd, dict) else sd.state_dict(); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
        f"'{path.stem}.safetensors')\"")


def _read_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise EncoderWeightsError(f"cannot read checkpoint {path}: not a readable safetensors file "
                                      f"({type(exc).__name__}: {exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        import pickle

        # weights_only refusals surface as UnpicklingError (a global it will not import) or,
        # for some objects, AttributeError/TypeError raised by its restricted unpickler.
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and ("weights_only" in text or "Weights only" in text
                                                         or "global" in text.lower()):
            raise _refusal(path, exc) from None
        raise EncoderWeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                                  f"{(text.splitlines() or [''])[0][:300]}") from None


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: nestings (``state_dict``, ``model``, ``teacher``, ...)
    unwrapped, metadata entries (epoch, args) dropped, DataParallel/compile prefixes removed."""
    for _ in range(4):  # {'model': {'state_dict': ...}} and the like
        if not isinstance(obj, dict):
            break
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)
                       and any(isinstance(v, (torch.Tensor, dict)) for v in obj[k].values())), None)
        if nested is None or (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            break
        obj = nested
    if not isinstance(obj, dict):
        raise EncoderWeightsError(f"checkpoint {source} does not hold a state dict of tensors "
                                  f"(it holds a {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise EncoderWeightsError(f"checkpoint {source} does not hold a state dict of tensors "
                                  f"(keys: {_preview(sorted(map(str, obj)))})")
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP / torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at ``path`` (a file or a hub snapshot folder), unwrapped."""
    files = checkpoint_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = unwrap_state_dict(_read_file(file), str(file))
        clash = set(part) & set(state)
        if clash:
            raise EncoderWeightsError(f"checkpoint {path}: shards repeat keys ({_preview(sorted(clash))})")
        state.update(part)
    return state


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of the weights ``path`` stands for: the file's own hash (a snapshot folder with one
    weights file hashes as that file), or of its shards' ``name sha256`` lines."""
    from ..io import sha256_file

    files = checkpoint_files(path)
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# -- layouts -> the build's keys -------------------------------------------------------------------

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def dinov2_to_timm(state: dict[str, torch.Tensor], expected: Shapes | None = None) -> dict[str, torch.Tensor]:
    """DINOv2 training layouts -> timm VisionTransformer keys; other dicts are returned as they are.

    Chunked blocks (``block_chunks > 0``: ``blocks.<chunk>.<i>.`` with a global ``i``) become
    ``blocks.<i>.``; ``mask_token`` and DINO/iBOT heads go. With registers (``register_tokens``),
    DINOv2 adds ``pos_embed[:, 0]`` to the class token and no position to the registers, while
    timm's ``no_embed_class`` build keeps no class position: the class position is folded into
    ``cls_token`` exactly as DINOv2 computes it. ``mlp.w12``/``mlp.w3`` (fused SwiGLU) are timm's
    packed ``mlp.fc1``/``mlp.fc2`` (same [x, gate] halves). ``expected`` (the build's shapes), if
    given, keeps ``pos_embed`` with its class position when the build has one.
    """
    if not any(_CHUNKED.match(k) or k in ("mask_token", "register_tokens") or ".mlp.w12." in k
               or k.startswith(("dino_head.", "ibot_head.")) for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_TRAINING_ONLY):
            continue
        key = _CHUNKED.sub(r"blocks.\1.", key)
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.get("pos_embed")
        keeps_class_pos = expected is not None and "pos_embed" in expected and pos is not None \
            and tuple(expected["pos_embed"]) == tuple(pos.shape)
        if pos is not None and "cls_token" in out and not keeps_class_pos:
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    return out


def _candidates(state: dict[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    """The state as is, without a common prefix, and each prefixed subset (``backbone.`` of a
    teacher + heads, ``visual.`` of a CLIP model), with nested prefixes (``module.backbone.``)."""
    seen = [state]
    yield state
    frontier = [state]
    for _ in range(3):
        nxt = []
        for s in frontier:
            for prefix in _PREFIXES:
                sub = {k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}
                if sub and all(sub.keys() != t.keys() for t in seen):
                    seen.append(sub)
                    nxt.append(sub)
                    yield sub
        frontier = nxt


def _fit(states: Iterable[dict[str, torch.Tensor]], expected: Shapes,
         ignore_prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor] | None, tuple[int, int]]:
    best, best_score = None, (-1, 0)
    for state in states:
        for cand in _candidates(state):
            for conv in (cand, dinov2_to_timm(cand, expected)):
                conv = {k: v for k, v in conv.items() if not k.startswith(ignore_prefixes)}
                agree = sum(1 for k, v in conv.items() if k in expected and tuple(v.shape) == tuple(expected[k]))
                score = (agree, -len(set(conv) ^ set(expected)))
                if score > best_score:
                    best, best_score = conv, score
    return best, best_score


def fit_to(state: dict[str, torch.Tensor], expected: Shapes,
           ignore_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The reading of ``state`` (prefixes off or subset kept, DINOv2 layout converted) whose keys
    and shapes agree best with ``expected`` — the as-is dict when nothing agrees better."""
    best, _ = _fit([state], expected, ignore_prefixes)
    return best if best is not None else state


def state_for(spec, state: dict[str, torch.Tensor], expected: Shapes) -> dict[str, torch.Tensor]:
    """``state`` as ``spec``'s build names it: the reading (the spec's own release converter
    applied or not — a file re-saved from this build already has its names) that fits best."""
    options = [state]
    if getattr(spec, "convert_state_dict", None) is not None:
        try:
            options.insert(0, spec.convert_state_dict(dict(state)))
        except Exception:  # a converter written for the release layout, given another layout
            pass
    best, _ = _fit(options, expected, tuple(getattr(spec, "ignore_prefixes", ())))
    return best if best is not None else state


# -- strict load and the wrong-file error -----------------------------------------------------------

def mismatch(state: Mapping[str, torch.Tensor], expected: Shapes) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape descriptions) of ``state`` against ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in set(state) & set(expected)
                   if tuple(state[k].shape) != tuple(expected[k]))
    return missing, unexpected, wrong


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str,
              ignore_prefixes: tuple[str, ...] = (), encoder: str | None = None,
              identify: Callable[[dict[str, torch.Tensor]], str] | None = None) -> None:
    """Strictly load ``state`` into ``model``; any mismatch is one error naming the keys (and,
    with ``identify``, which registered encoders the file fits and the config line to use).

    ``ignore_prefixes``: checkpoint keys of parts the encoder removes on purpose (e.g. a truncated
    ResNet's layer4 and fc), dropped before the strict check.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, wrong = mismatch(state, expected)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {_preview(wrong, 4)}")
        given = f" (given as encoder {encoder!r})" if encoder else ""
        hint = f"; {identify(state)}" if identify is not None else ""
        raise EncoderWeightsError(f"checkpoint {source}{given} does not fit the encoder: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)


_META_SHAPES: dict[int, Shapes | None] = {}


def meta_shapes(spec) -> Shapes | None:
    """Key -> shape of ``spec``'s full-size build, made on the meta device (no memory, no init:
    builders may carry ``meta_overrides``, e.g. timm's ``weight_init='skip'``); cached per builder.
    None for parameter-free entries and builds that cannot run on the meta device."""
    key = id(spec.build)
    if key not in _META_SHAPES:
        shapes = None
        if not getattr(spec, "parameter_free", False):
            try:
                with torch.device("meta"):
                    model = spec.build(**getattr(spec.build, "meta_overrides", {}))
                shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            except Exception:  # an entry that needs real tensors to build is left out of the search
                shapes = None
        _META_SHAPES[key] = shapes
    return _META_SHAPES[key]


def fitting_encoders(state: Mapping[str, torch.Tensor] | Shapes, specs: Iterable) -> list[str]:
    """Names of the ``specs`` whose full-size build the tensors of ``state`` fit exactly (after
    each spec's own layout conversion). ``state`` may hold tensors or bare shapes."""
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.empty(tuple(v), device="meta"))
               for k, v in state.items()}
    have = Counter(tuple(v.shape) for v in tensors.values())
    names = []
    for spec in specs:
        expected = meta_shapes(spec)
        if expected is None:
            continue
        # Without a converter of its own, layouts only drop keys or fold the class position into
        # cls_token: every other tensor shape of the build must be in the file.
        if getattr(spec, "convert_state_dict", None) is None:
            need = Counter(s for k, s in expected.items() if k not in ("pos_embed", "cls_token"))
            if need - have:
                continue
        converted = state_for(spec, dict(tensors), expected)
        if converted.keys() == expected.keys() and all(tuple(v.shape) == expected[k] for k, v in converted.items()):
            names.append(spec.name)
    return names


def describe_fit(source: str, encoder: str, fits: list[str], aliases: Mapping[str, str],
                 same_weights: Callable[[str, str], bool] = lambda a, b: False) -> str:
    """The sentence that tells a user which encoder a checkpoint is for (one line)."""
    fits = [n for n in fits if n != encoder]
    if not fits:
        return "its tensor shapes fit no registered encoder (see `wsi-pipeline encoders`)"
    primary: list[str] = []
    for name in fits:  # aliases and output variants of one entry are one choice
        root = aliases.get(name, name)
        if root not in primary and not any(same_weights(root, p) for p in primary):
            primary.append(root)
    others = sorted(set(fits) - set(primary))
    also = f" (also {', '.join(others)})" if others else ""
    lines = " or ".join(f"`extract: {{encoder: {n}, checkpoint: {source}}}`" for n in primary)
    if len(primary) == 1:
        return f"its tensor shapes fit {primary[0]}{also}: use {lines}"
    return (f"its tensor shapes fit {', '.join(primary)}{also} — shapes cannot tell these apart (same "
            f"architecture); use the one the file was released as: {lines}")


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def warn_if_named_for_another(path: Path, encoder: str, spec_files: Mapping[str, tuple[str, ...]]) -> None:
    """A file named as another entry's release (``mSTAR.pth`` given as ``uni``) loads when the two
    share shapes; say so, since the features would be another model's."""
    name = path.name if path.is_file() else ""
    if not name or name in _SNAPSHOT_FILES or name == "config.json":  # hub file names say nothing
        return
    owners = sorted(n for n, files in spec_files.items() if name in files)
    if owners and encoder not in owners:
        warnings.warn(f"checkpoint {path}: {name} is the name of {', '.join(owners)}'s release, loaded as "
                      f"{encoder!r}; shapes cannot tell these models apart — check the encoder name",
                      stacklevel=3)
