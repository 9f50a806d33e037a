"""Patch encoders: `create_encoder(name, checkpoint=..., device=...)` → `Encoder` (uint8 in, (B, D) out)."""

from . import builtin  # noqa: F401  (registers the built-in entries)
from .registry import ENCODERS, Encoder, EncoderSpec, create_encoder, get_spec, list_encoders, register_encoder
from .weights import EncoderWeightsError, read_state_dict

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "EncoderWeightsError", "create_encoder", "get_spec",
           "list_encoders", "read_state_dict", "register_encoder"]
