"""`stain_texture`: classical colour and texture descriptors of an H&E patch, no learned weights.

Why it exists: a pretrained encoder (UNI, an ImageNet ResNet) needs weights that air-gapped machines
and CI cannot download, and a randomly initialised deep network scrambles what a patch shows (on the
demo cohort, a linear probe on random ResNet-50 features separates lesion from normal patches at
AUC 0.31; on these descriptors at > 0.99). Hand-made descriptors were the field's baseline before
foundation models: they are cheap on a CPU, deterministic, and enough for the demo cohort, whose
lesions differ in stain and nuclear density. They are not a substitute for a pathology foundation
model on real slides.

Per patch (input in [0, 1] RGB), 60 numbers:
  RGB        mean, std, 10/50/90th percentiles per channel                          15
  stains     haematoxylin and eosin concentrations by colour deconvolution
             (Ruifrok & Johnston's H&E-DAB optical-density vectors): mean, std,
             10/50/90th percentiles                                                  10
  nuclei     fraction of pixels above three haematoxylin levels                      3
  histogram  haematoxylin histogram, 8 bins over [0, 2] optical density              8
  texture    at 1, 2 and 4 px scales, of grey level and of haematoxylin: log mean and
             log std of the gradient magnitude, log mean |Laplacian|                 18
  structure  log variance of 8 px-block means, grey and haematoxylin,
             and their correlation across the patch                                  6

Scales (encoder version 2). Every block is mapped by a fixed affine (or variance-stabilising)
transform so that each descriptor varies by O(1) over typical H&E patches, and a linear probe and a
MIL model see the same geometry without a fitted scaler (the MIL trainer standardises anyway):
  RGB, stains   (v - centre) / 0.1 with centre 0.7 (RGB) and 0.1 (stain concentration, OD units)
  fractions     (sqrt(p) - 0.2) / 0.1 for the nuclear fractions and histogram bins: the square root
                stabilises the variance of proportions, so a bin that is mostly 0 is not ~1e-3 wide
  logs          (log x + 3) / 0.5 for the texture and structure log-magnitudes
  correlation   r / 0.25;  block fraction above the mean  (f - 0.2) / 0.1
Over 707 tissue patches of 6 hard-demo slides (224 px at 0.5 µm/px) the per-dimension std went from
1.0e-3 .. 0.88 (version 1, raw) to the range given in BENCHMARKS.md (about 0.1 .. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import EncoderSpec, register_encoder

# Optical-density colour vectors (rows: haematoxylin, eosin, DAB), Ruifrok & Johnston 2001.
_STAIN_OD = torch.tensor([[0.650, 0.704, 0.286],
                          [0.072, 0.990, 0.105],
                          [0.268, 0.570, 0.776]])
_QUANTILES = (0.1, 0.5, 0.9)
_NUCLEAR_LEVELS = (0.4, 0.8, 1.2)
_HIST_BINS = 8
_HIST_MAX = 2.0
_EPS = 1e-4

STAIN_TEXTURE_DIM = 15 + 10 + 3 + 8 + 18 + 6
# Bumped when the descriptors change: recorded in features.h5 and part of the extract config hash,
# so features of an older version are re-extracted.
STAIN_TEXTURE_VERSION = 2
_RGB_CENTRE, _STAIN_CENTRE, _INTENSITY_SCALE = 0.7, 0.1, 0.1
_SQRT_FRACTION_CENTRE, _FRACTION_SCALE = 0.2, 0.1
_LOG_CENTRE, _LOG_SCALE = -3.0, 0.5
_CORR_SCALE = 0.25
_BLOCK_FRACTION_CENTRE = 0.2


def _quantiles(x: torch.Tensor, qs=_QUANTILES) -> torch.Tensor:
    """(B, C, P) -> (B, C * len(qs)); by sorting, since torch.quantile refuses large inputs."""
    s = x.sort(dim=-1).values
    n = s.shape[-1]
    idx = torch.tensor([round(q * (n - 1)) for q in qs], device=x.device)
    return s.index_select(-1, idx).flatten(1)


def _gradient_stats(img: torch.Tensor) -> list[torch.Tensor]:
    """log mean / log std of the gradient magnitude and log mean |Laplacian| of (B, 1, H, W)."""
    gx = img[..., :-1, 1:] - img[..., :-1, :-1]
    gy = img[..., 1:, :-1] - img[..., :-1, :-1]
    mag = torch.sqrt(gx * gx + gy * gy + 1e-12).flatten(1)
    lap = (img[..., 1:-1, :-2] + img[..., 1:-1, 2:] + img[..., :-2, 1:-1] + img[..., 2:, 1:-1]
           - 4 * img[..., 1:-1, 1:-1]).abs().flatten(1)
    return [torch.log(mag.mean(1) + _EPS), torch.log(mag.std(1) + _EPS), torch.log(lap.mean(1) + _EPS)]


def _log_scaled(v: torch.Tensor) -> torch.Tensor:
    return (v - _LOG_CENTRE) / _LOG_SCALE


class StainTextureFeatures(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 60) descriptors (see the module docstring)."""

    num_features = STAIN_TEXTURE_DIM

    def __init__(self):
        super().__init__()
        od = _STAIN_OD / _STAIN_OD.norm(dim=1, keepdim=True)
        self.register_buffer("od_to_stain", torch.linalg.inv(od), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0.0, 1.0)
        b = x.shape[0]
        rgb = x.flatten(2)
        feats = [(rgb.mean(-1) - _RGB_CENTRE) / _INTENSITY_SCALE, rgb.std(-1) / _INTENSITY_SCALE,
                 (_quantiles(rgb) - _RGB_CENTRE) / _INTENSITY_SCALE]

        # Optical density -> stain concentrations (H, E); 1/255 floor as for 8-bit images.
        od = -torch.log10(x.clamp_min(1.0 / 255.0))
        stains = torch.einsum("bchw,cs->bshw", od, self.od_to_stain)[:, :2].clamp_min(0.0)
        he = stains.flatten(2)
        feats += [(he.mean(-1) - _STAIN_CENTRE) / _INTENSITY_SCALE, he.std(-1) / _INTENSITY_SCALE,
                  (_quantiles(he) - _STAIN_CENTRE) / _INTENSITY_SCALE]

        h = stains[:, :1]
        h_flat = h.flatten(1)
        fractions = [torch.stack([(h_flat > t).float().mean(1) for t in _NUCLEAR_LEVELS], dim=1)]
        bins = (h_flat / _HIST_MAX * _HIST_BINS).long().clamp(0, _HIST_BINS - 1)
        counts = torch.zeros(b, _HIST_BINS, device=x.device).scatter_add_(1, bins, torch.ones_like(h_flat))
        fractions.append(counts / h_flat.shape[1])
        feats += [(f.sqrt() - _SQRT_FRACTION_CENTRE) / _FRACTION_SCALE for f in fractions]

        grey = x.mean(1, keepdim=True)
        for scale in (1, 2, 4):
            g = F.avg_pool2d(grey, scale) if scale > 1 else grey
            hs = F.avg_pool2d(h, scale) if scale > 1 else h
            feats += [_log_scaled(v) for v in _gradient_stats(g) + _gradient_stats(hs)]

        blocks_g = F.avg_pool2d(grey, 8).flatten(1)
        blocks_h = F.avg_pool2d(h, 8).flatten(1)
        gc = blocks_g - blocks_g.mean(1, keepdim=True)
        hc = blocks_h - blocks_h.mean(1, keepdim=True)
        corr = (gc * hc).mean(1) / (gc.std(1, unbiased=False) * hc.std(1, unbiased=False) + _EPS)
        feats += [_log_scaled(torch.log(blocks_g.var(1) + _EPS)), _log_scaled(torch.log(blocks_h.var(1) + _EPS)),
                  corr / _CORR_SCALE,
                  # Whole-patch contrast between the grey and haematoxylin images at block scale.
                  _log_scaled(torch.log(gc.abs().mean(1) + _EPS)), _log_scaled(torch.log(hc.abs().mean(1) + _EPS)),
                  ((blocks_h > h_flat.mean(1, keepdim=True)).float().mean(1) - _BLOCK_FRACTION_CENTRE)
                  / _FRACTION_SCALE]

        out = torch.cat([f if f.dim() == 2 else f[:, None] for f in feats], dim=1)
        return out


register_encoder(EncoderSpec(
    name="stain_texture", build=StainTextureFeatures, out_dim=STAIN_TEXTURE_DIM,
    # The descriptors take RGB in [0, 1]: Encoder.normalise divides by 255 and nothing else.
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), parameter_free=True, version=STAIN_TEXTURE_VERSION,
    # Below 16 px its 8-px block statistics have one block (non-finite spreads).
    min_input_px=16,
    notes="colour-deconvolution and texture descriptors, no weights (checkpoint: none); "
          "the offline demo's encoder, not a foundation-model substitute",
    license="Apache-2.0", weights_license="none (no weights)",
    reference="this project; stain vectors from Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001"))
