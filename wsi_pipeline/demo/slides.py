"""A synthetic demo cohort: H&E-like pyramidal slides with planted lesions and their ground truth.

Pixels follow the Beer–Lambert stain model pathology colour tools use: optical density
OD = c_H · h + c_E · e (h, e: haematoxylin and eosin stain vectors), intensity = I0 · 10^-OD.
Each slide perturbs the stain vectors and intensities (scanner/lab variation). Positive slides carry
lesions: denser, larger, darker nuclei with mitoses, which a patch encoder can see.

Hard mode (`hard=True`, `wsi-pipeline demo-cohort --hard`): lesions of about 1-4 patches (at
0.5 µm/px, 224 px patches), benign confounders on every slide (clusters of dense, small, dark
inflammatory-like nuclei, which raise haematoxylin as a lesion does), a stronger per-slide stain
shift, and several glass holes in the tissue. Lesions differ from the confounders in nuclear size and
pleomorphism, chromatin-poor eosin and mitoses, not in "more haematoxylin".

Ground truth per slide: lesion mask PNG (+ its downsample in the JSON sidecar), nucleus and mitosis
points (level-0 pixels) as CSV — for the heatmap, segmentation and detection stages to score against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io import atomic_path, write_csv_atomic, write_json_atomic
from ..slides.tiff_writer import build_pyramid, write_aperio_tiff

# Haematoxylin: Ruifrok & Johnston's optical-density vector. Eosin: fitted to the pink of stroma in
# typical scans (their vector renders magenta without the counterstain background).
_H_VEC = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_VEC = np.array([0.092, 0.901, 0.424], dtype=np.float32)
# Lesion masks and tissue fields are built on a coarse grid, then upsampled to level 0.
GT_DOWNSAMPLE = 16


@dataclass(frozen=True)
class DemoSlideSpec:
    width_px: int = 6144
    height_px: int = 4096
    mpp: float = 0.5
    positive: bool = False
    seed: int = 0
    n_lesions: int = 2
    # Where the resolution is recorded: "aperio" (MPP in the description), "tiff-tags", or "none".
    mpp_metadata: str = "aperio"
    compression: str = "jpeg"
    # Hard mode: small lesions, confounders, stronger stain shift, more holes (module docstring).
    hard: bool = False


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth_noise(rng, shape, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _coarse_masks(rng, spec: DemoSlideSpec):
    """Tissue and lesion masks on the coarse grid (GT_DOWNSAMPLE level-0 px per cell)."""
    gh, gw = spec.height_px // GT_DOWNSAMPLE, spec.width_px // GT_DOWNSAMPLE
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    # An elliptical envelope keeps the specimen away from the slide edges, noise makes it irregular.
    cy, cx = gh * rng.uniform(0.42, 0.58), gw * rng.uniform(0.42, 0.58)
    envelope = 1.0 - (((yy - cy) / (0.40 * gh)) ** 2 + ((xx - cx) / (0.40 * gw)) ** 2)
    tissue = envelope + 0.35 * _smooth_noise(rng, (gh, gw), sigma_px=min(gh, gw) / 12) > 0.15
    # Glass holes (fat vacuoles / tears) inside the specimen: one, or 3-5 in hard mode.
    for _ in range(int(rng.integers(3, 6)) if spec.hard else 1):
        hy, hx = cy + rng.uniform(-0.1, 0.1) * gh, cx + rng.uniform(-0.15, 0.15) * gw
        if spec.hard:
            hy, hx = cy + rng.uniform(-0.25, 0.25) * gh, cx + rng.uniform(-0.25, 0.25) * gw
        hole_r = (rng.uniform(0.03, 0.06) if spec.hard else 0.06) * min(gh, gw)
        tissue &= ((yy - hy) ** 2 + (xx - hx) ** 2) > hole_r ** 2
    tissue = ndimage.binary_opening(tissue, iterations=2)
    lesion = np.zeros_like(tissue)
    if spec.positive and spec.hard:
        # 1-2 small lesions of ~1-4 patches each: radius 50-110 µm (a 224 px patch at 0.5 µm/px
        # is 112 µm square, i.e. an equal-area disc of radius 63 µm).
        inner = ndimage.binary_erosion(tissue, iterations=8)
        candidates = np.argwhere(inner) if inner.any() else np.argwhere(tissue)
        cell_um = GT_DOWNSAMPLE * spec.mpp
        for _ in range(int(rng.integers(1, 3))):
            ly, lx = candidates[rng.integers(len(candidates))]
            r = rng.uniform(50.0, 110.0) / cell_um
            blob = ((yy - ly) / r) ** 2 + ((xx - lx) / (r * rng.uniform(0.8, 1.25))) ** 2
            lesion |= blob + 0.2 * _smooth_noise(rng, (gh, gw), sigma_px=3.0) < 1.0
        lesion &= tissue
    elif spec.positive:
        inner = ndimage.binary_erosion(tissue, iterations=max(2, min(gh, gw) // 20))
        candidates = np.argwhere(inner)
        if len(candidates) == 0:
            candidates = np.argwhere(tissue)
        for _ in range(spec.n_lesions):
            ly, lx = candidates[rng.integers(len(candidates))]
            ry, rx = rng.uniform(0.07, 0.13) * gh, rng.uniform(0.07, 0.13) * gw
            blob = ((yy - ly) / ry) ** 2 + ((xx - lx) / rx) ** 2
            blob = blob + 0.25 * _smooth_noise(rng, (gh, gw), sigma_px=min(gh, gw) / 30) < 1.0
            lesion |= blob
        lesion &= tissue
    return tissue, lesion


def _confounders(rng, tissue: np.ndarray, lesion: np.ndarray, spec: DemoSlideSpec) -> np.ndarray:
    """Hard mode: 3-6 benign clusters of dense small nuclei (inflammation-like) on the coarse grid,
    each about the size of a small lesion, outside the lesions."""
    gh, gw = tissue.shape
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    out = np.zeros_like(tissue)
    candidates = np.argwhere(tissue & ~lesion)
    if len(candidates) == 0:
        return out
    cell_um = GT_DOWNSAMPLE * spec.mpp
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = candidates[rng.integers(len(candidates))]
        r = rng.uniform(50.0, 120.0) / cell_um
        out |= ((yy - cy) / r) ** 2 + ((xx - cx) / (r * rng.uniform(0.7, 1.4))) ** 2 < 1.0
    return out & tissue & ~ndimage.binary_dilation(lesion, iterations=2)


def _disc_offsets(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    keep = oy ** 2 + ox ** 2 <= radius_px ** 2
    return np.stack([oy[keep], ox[keep]], axis=1)


def _stamp(field: np.ndarray, centres_yx: np.ndarray, radius_px: float, value: float) -> None:
    """Set `field` to max(field, value) on discs around `centres_yx` (N, 2), vectorised."""
    if len(centres_yx) == 0:
        return
    offsets = _disc_offsets(radius_px)
    pts = centres_yx[:, None, :] + offsets[None, :, :]
    pts = pts.reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < field.shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < field.shape[1])
    pts = pts[inside]
    flat = pts[:, 0] * field.shape[1] + pts[:, 1]
    view = field.reshape(-1)
    view[flat] = np.maximum(view[flat], value)


def _sample_points(rng, mask_coarse: np.ndarray, density_per_um2: float, spec: DemoSlideSpec) -> np.ndarray:
    """Poisson points (level-0 y, x) inside a coarse mask at `density_per_um2`."""
    cells = np.argwhere(mask_coarse)
    if len(cells) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cell_area_um2 = (GT_DOWNSAMPLE * spec.mpp) ** 2
    n = rng.poisson(density_per_um2 * cell_area_um2 * len(cells))
    pick = cells[rng.integers(len(cells), size=n)]
    jitter = rng.uniform(0, GT_DOWNSAMPLE, size=(n, 2))
    return (pick * GT_DOWNSAMPLE + jitter).astype(np.int64)


def render_slide(spec: DemoSlideSpec):
    """Returns (rgb (H, W, 3) uint8, tissue_coarse, lesion_coarse, nuclei (N, 3) [x, y, in_lesion],
    mitoses (M, 2) [x, y]) — points in level-0 pixels."""
    rng = np.random.default_rng(spec.seed)
    tissue_c, lesion_c = _coarse_masks(rng, spec)
    H, W = spec.height_px, spec.width_px

    def up(mask_c):
        # Smooth upsampling then threshold gives natural (not blocky) edges at level 0.
        m = ndimage.zoom(mask_c.astype(np.float32), GT_DOWNSAMPLE, order=1)
        out = np.zeros((H, W), dtype=np.float32)
        out[:m.shape[0], :m.shape[1]] = m[:H, :W]
        return out

    tissue = up(tissue_c) > 0.5
    lesion = up(lesion_c) > 0.5

    # Stain concentrations. Eosin: stroma texture; haematoxylin: nuclei plus faint background.
    um = spec.mpp
    texture = ndimage.zoom(_smooth_noise(rng, (H // 4, W // 4), sigma_px=6.0 / um / 4), 4, order=1)
    tex = np.zeros((H, W), dtype=np.float32)
    tex[:texture.shape[0], :texture.shape[1]] = texture[:H, :W]
    conc_e = np.where(tissue, 0.24 + 0.07 * tex, 0.0).astype(np.float32)
    conc_h = np.where(tissue, 0.04 + 0.015 * tex, 0.0).astype(np.float32)
    conc_e[lesion] *= 0.75
    conc_h[lesion] += 0.10

    normal_c = tissue_c & ~lesion_c
    nuclei_n = _sample_points(rng, normal_c, 1 / 350.0, spec)   # ~1 nucleus per 350 µm²
    # Hard mode: benign dense clusters of small, round, very dark nuclei (lymphocyte-like).
    inflamed_c = _confounders(rng, tissue_c, lesion_c, spec) if spec.hard else np.zeros_like(tissue_c)
    nuclei_i = _sample_points(rng, inflamed_c, 1 / 45.0, spec)
    nuclei_l = _sample_points(rng, lesion_c, 1 / 110.0, spec)   # crowded lesion
    mitoses = _sample_points(rng, lesion_c, 1 / 20_000.0, spec)
    nucleus_field = np.zeros((H, W), dtype=np.float32)
    _stamp(nucleus_field, nuclei_n, 2.5 / um, 0.55)
    _stamp(nucleus_field, nuclei_i, 2.0 / um, 1.0)
    large = rng.random(len(nuclei_l)) < 0.4  # pleomorphic: two sizes
    _stamp(nucleus_field, nuclei_l[~large], 3.5 / um, 0.85)
    _stamp(nucleus_field, nuclei_l[large], 4.5 / um, 0.85)
    for centre in mitoses:  # clumped, very dark chromatin: a few overlapping small discs
        parts = centre[None, :] + rng.normal(0, 2.0 / um, size=(4, 2)).astype(np.int64)
        _stamp(nucleus_field, parts, 1.8 / um, 1.4)
    conc_h = np.where(tissue, conc_h + nucleus_field, 0.0)
    conc_e = np.where(nucleus_field > 0, conc_e * 0.5, conc_e)

    # Per-slide stain variation: perturbed vectors and strengths, background brightness.
    # Hard mode doubles the vector noise and widens gains and background.
    vec_sd, gain, bg = (0.10, (0.65, 1.35), (222, 248)) if spec.hard else (0.05, (0.8, 1.2), (232, 246))
    h_vec = _unit(_H_VEC + rng.normal(0, vec_sd, 3).astype(np.float32))
    e_vec = _E_VEC + rng.normal(0, vec_sd, 3).astype(np.float32)
    e_vec = _unit(np.abs(e_vec) if spec.hard else e_vec)  # hard: keep eosin absorbing in every channel
    h_gain, e_gain = rng.uniform(*gain), rng.uniform(*gain)
    background = rng.uniform(*bg)
    od = (conc_h[..., None] * h_gain * h_vec + conc_e[..., None] * e_gain * e_vec)
    rgb = background * np.power(10.0, -od, dtype=np.float32)
    rgb += rng.normal(0, 2.0, size=(H, W, 1)).astype(np.float32)
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    nuclei_n = np.concatenate([nuclei_n, nuclei_i])
    nuclei = np.concatenate([
        np.column_stack([nuclei_n[:, 1], nuclei_n[:, 0], np.zeros(len(nuclei_n), dtype=np.int64)]),
        np.column_stack([nuclei_l[:, 1], nuclei_l[:, 0], np.ones(len(nuclei_l), dtype=np.int64)]),
    ]).astype(np.int64)
    keep = (nuclei[:, 0] < W) & (nuclei[:, 1] < H)
    mitoses_xy = mitoses[:, ::-1]
    mitoses_xy = mitoses_xy[(mitoses_xy[:, 0] < W) & (mitoses_xy[:, 1] < H)]
    return rgb, tissue_c, lesion_c, nuclei[keep], mitoses_xy


def write_demo_slide(path: str | Path, spec: DemoSlideSpec) -> dict:
    """Render `spec`, write the slide and its ground truth beside it; returns the truth summary."""
    path = Path(path)
    rgb, _tissue_c, lesion_c, nuclei, mitoses = render_slide(spec)
    write_aperio_tiff(path, build_pyramid(rgb), mpp=None if spec.mpp_metadata == "none" else spec.mpp,
                      compression=spec.compression,
                      resolution_tags=spec.mpp_metadata == "tiff-tags",
                      describe_mpp=spec.mpp_metadata == "aperio",
                      app_mag=20.0 if spec.mpp_metadata == "aperio" else None)
    stem = path.with_suffix("")
    with atomic_path(f"{stem}.lesion.png") as tmp:
        Image.fromarray((lesion_c * 255).astype(np.uint8)).save(tmp)
    write_csv_atomic(f"{stem}.nuclei.csv", ["x", "y", "in_lesion"], nuclei.tolist())
    write_csv_atomic(f"{stem}.mitoses.csv", ["x", "y"], mitoses.tolist())
    truth = {
        "slide": path.name,
        "positive": spec.positive,
        "mpp": spec.mpp,
        "level0_width": spec.width_px,
        "level0_height": spec.height_px,
        "lesion_mask": f"{stem.name}.lesion.png",
        "lesion_mask_downsample": GT_DOWNSAMPLE,
        "lesion_area_um2": float(lesion_c.sum() * (GT_DOWNSAMPLE * spec.mpp) ** 2),
        "n_nuclei": int(len(nuclei)),
        "n_mitoses": int(len(mitoses)),
        "hard": spec.hard,
    }
    write_json_atomic(f"{stem}.truth.json", truth)
    return truth


HARD_SIZE_PX = (4096, 3072)  # hard-mode default: ~120 tissue patches per slide at 0.5 µm/px, 224 px


def make_demo_cohort(out_dir: str | Path, n_slides: int = 8, *, width_px: int | None = None,
                     height_px: int | None = None, mpp: float = 0.5, seed: int = 0,
                     cohorts: tuple[str, ...] = ("demo",), compression: str = "jpeg",
                     progress: bool = False, hard: bool = False) -> Path:
    """Write `n_slides` slides (half positive, alternating) + `manifest.csv` into `out_dir`.

    Size defaults: 6144×4096 px, or 4096×3072 px with `hard` (see the module docstring).

    Patients own one or two slides (every third patient has two, same label), so patient-level
    splitting matters; patients are spread round-robin over `cohorts`. Returns the manifest path.
    """
    if n_slides < 1:
        raise ValueError("n_slides must be >= 1")
    default_w, default_h = HARD_SIZE_PX if hard else (6144, 4096)
    width_px = width_px or default_w
    height_px = height_px or default_h
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rows = []
    slide_index, patient_index = 0, 0
    rng = np.random.default_rng(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_slides, desc="demo slides", unit="slide")
    while slide_index < n_slides:
        positive = patient_index % 2 == 1
        n_for_patient = 2 if patient_index % 3 == 2 else 1
        patient_id = f"P{patient_index:03d}"
        cohort = cohorts[patient_index % len(cohorts)]
        for _ in range(min(n_for_patient, n_slides - slide_index)):
            slide_id = f"DEMO-{slide_index:03d}"
            spec = DemoSlideSpec(width_px=width_px, height_px=height_px, mpp=mpp, positive=positive,
                                 seed=int(rng.integers(2**31)), compression=compression,
                                 hard=hard)
            write_demo_slide(out_dir / "slides" / f"{slide_id}.svs", spec)
            rows.append([slide_id, f"slides/{slide_id}.svs", patient_id,
                         "tumor" if positive else "normal", cohort])
            slide_index += 1
            if bar is not None:
                bar.update(1)
        patient_index += 1
    if bar is not None:
        bar.close()
    manifest = out_dir / "manifest.csv"
    write_csv_atomic(manifest, ["slide_id", "path", "patient_id", "label", "cohort"], rows)
    return manifest
