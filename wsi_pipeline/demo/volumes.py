"""A synthetic CT-like cohort: `write_demo_volumes(out)` → NIfTI scans, truth masks, manifest.csv.

Each patient is one abdominal-ish phantom defined in RAS millimetres and sampled on its own file
grid, so the cohort mixes spacings (in-plane 1.2–2.4 mm, slices 2–5 mm) and orientations (RAS,
LPS, and permuted axes such as slices first): reading must canonicalise to get it right.

    body      ellipsoid of soft tissue (40 HU) in a 10 mm fat rim (-100 HU), air (-1000 HU) outside
    organs    liver (60 HU, patient's right: +x in RAS), spleen (45 HU, left), two kidneys (30 HU), spine (700 HU bone),
              a gas pocket (-700 HU); sizes and positions jittered per patient
    lesions   positive scans: 1–2 hypodense spheres (liver -45 HU relative, radius 11–16 mm) inside
              the liver; `{id}_lesion.nii.gz` is their truth mask on the scan's grid (empty for
              negatives)
    noise     Gaussian, σ 12 HU; stored as int16 HU

`hard=True` (`wsi-pipeline demo-volumes OUT --hard`): what a CT cohort nobody tuned to looks like,
within a small synthetic phantom (FOV 180 x 150 x 72 mm so a CPU run stays minutes):

    grids     in-plane 0.7-1.1 mm, slices 1.5-3.5 mm, five orientations
    organs    liver 60, spleen 48, kidneys 32 HU (as above, sizes and places jittered)
    lesions   positive scans: 1-2 spheres of radius 6-12 mm, 25-40 HU hypo- or hyperdense, each in
              the liver, the spleen or a kidney (drawn per lesion), kept inside its organ
    confounders in every scan: a fluid-filled sac (5-12 HU, radius 12-18 mm), bright vessels (the
              aorta, radius 8-10 mm, and 2-3 vessels of radius 2.5-4 mm through the liver, 150-200 HU),
              2-4 calcifications (radius 1.5-3 mm, 300-600 HU)
    scanner   a calibration offset of -15 to +15 HU per scan; noise σ 15-20 HU

The manifest names each scan by `volume_id` (the slide_id alias of volume rows), with `modality` CT
and `truth_mask` (the lesion mask, for Dice): see manifests/README.md.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ..volumes.explain import write_nifti

# Signed axis permutations (rows: world R, A, S; columns: file axes) the cohort cycles through.
ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "SRA": np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float),       # file axis 0 = S (slices first)
    "PIL": np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], dtype=float),
    "ASR": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float),
}
FOV_MM = np.array([200.0, 170.0, 110.0])    # R-L, A-P, S-I extent of every scan
HARD_FOV_MM = np.array([180.0, 150.0, 72.0])
HARD_ORIENTATIONS = ("RAS", "LPS", "SRA", "PIL", "ASR")


def _ellipsoid(points, centre, radii) -> np.ndarray:
    return (((points - centre) / radii) ** 2).sum(axis=-1) <= 1.0


def phantom(points_mm: np.ndarray, rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU and lesion truth at world points (..., 3) RAS mm for one random patient."""
    scale = rng.uniform(0.9, 1.08)
    body_r = np.array([88.0, 68.0, 80.0]) * scale
    hu = np.full(points_mm.shape[:-1], -1000.0, dtype=np.float32)
    body = _ellipsoid(points_mm, 0.0, body_r)
    hu[body] = -100.0
    hu[_ellipsoid(points_mm, 0.0, body_r - 10.0)] = 40.0
    jitter = lambda s: rng.normal(0.0, s, 3)  # noqa: E731
    liver_c, liver_r = np.array([38.0, 8.0, 10.0]) + jitter(3), np.array([38.0, 40.0, 42.0]) * scale
    organs = [
        (liver_c, liver_r, 60.0),
        (np.array([-45.0, 5.0, 15.0]) + jitter(3), np.array([18.0, 26.0, 24.0]) * scale, 45.0),
        (np.array([-35.0, -30.0, -10.0]) + jitter(2), np.array([14.0, 14.0, 26.0]), 30.0),
        (np.array([35.0, -30.0, -10.0]) + jitter(2), np.array([14.0, 14.0, 26.0]), 30.0),
        (np.array([10.0, 35.0, -25.0]) + jitter(4), np.array([16.0, 12.0, 12.0]), -700.0),
    ]
    for centre, radii, value in organs:
        hu[_ellipsoid(points_mm, centre, radii) & body] = value
    spine = (((points_mm[..., 0]) / 14.0) ** 2 + ((points_mm[..., 1] + 50.0) / 14.0) ** 2 <= 1.0) & body
    hu[spine] = 700.0
    lesion = np.zeros(hu.shape, dtype=bool)
    if positive:
        for _ in range(rng.integers(1, 3)):
            radius = rng.uniform(11.0, 16.0)
            # Inside the liver, far enough from its edge that the sphere stays in it.
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            offset = direction * rng.uniform(0.0, 0.45) * (liver_r - radius)
            sphere = _ellipsoid(points_mm, liver_c + offset, np.full(3, radius))
            lesion |= sphere
        hu[lesion] = 60.0 - 45.0
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    return hu, lesion


def _tube(points, centre, direction, radius) -> np.ndarray:
    """Points within `radius` of the line through `centre` along `direction` (an infinite cylinder)."""
    d = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
    rel = points - centre
    along = rel @ d
    return ((rel ** 2).sum(axis=-1) - along ** 2) <= radius ** 2


def hard_phantom(points_mm: np.ndarray, rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU and lesion truth at world points (..., 3) RAS mm for one patient of the hard cohort
    (module docstring)."""
    scale = rng.uniform(0.92, 1.06)
    body_r = np.array([82.0, 64.0, 90.0]) * scale
    hu = np.full(points_mm.shape[:-1], -1000.0, dtype=np.float32)
    body = _ellipsoid(points_mm, 0.0, body_r)
    hu[body] = -100.0
    hu[_ellipsoid(points_mm, 0.0, body_r - 10.0)] = 40.0
    jitter = lambda s: rng.normal(0.0, s, 3)  # noqa: E731
    organs = {
        "liver": (np.array([36.0, 10.0, 4.0]) + jitter(3), np.array([34.0, 36.0, 40.0]) * scale, 60.0),
        "spleen": (np.array([-44.0, 8.0, 6.0]) + jitter(3), np.array([20.0, 24.0, 26.0]) * scale, 48.0),
        "kidney_r": (np.array([33.0, -32.0, -4.0]) + jitter(2), np.array([17.0, 16.0, 28.0]), 32.0),
        "kidney_l": (np.array([-33.0, -32.0, -4.0]) + jitter(2), np.array([17.0, 16.0, 28.0]), 32.0),
    }
    masks = {}
    for name, (centre, radii, value) in organs.items():
        masks[name] = _ellipsoid(points_mm, centre, radii) & body
        hu[masks[name]] = value
    spine = (((points_mm[..., 0]) / 13.0) ** 2 + ((points_mm[..., 1] + 46.0) / 13.0) ** 2 <= 1.0) & body
    hu[spine] = 700.0
    # Confounders in every scan: a fluid sac, the aorta and vessels through the liver, calcifications.
    sac_c = np.array([rng.uniform(-15, 15), rng.uniform(20, 35), rng.uniform(-20, 20)])
    hu[_ellipsoid(points_mm, sac_c, rng.uniform(12.0, 18.0, 3)) & body] = rng.uniform(5.0, 12.0)
    aorta = _tube(points_mm, np.array([rng.uniform(-6, 6), -24.0 + rng.uniform(-3, 3), 0.0]), [0.0, 0.0, 1.0],
                  rng.uniform(8.0, 10.0)) & body
    hu[aorta] = rng.uniform(150.0, 200.0)
    liver_c, liver_r, _ = organs["liver"]
    for _ in range(rng.integers(2, 4)):
        vessel = _tube(points_mm, liver_c + rng.normal(0, 8, 3), rng.normal(size=3), rng.uniform(2.5, 4.0))
        hu[vessel & masks["liver"]] = rng.uniform(150.0, 200.0)
    names = list(organs)
    for _ in range(rng.integers(2, 5)):
        centre, radii, _ = organs[names[rng.integers(len(names))]]
        spot = centre + rng.uniform(-0.6, 0.6, 3) * radii
        hu[_ellipsoid(points_mm, spot, np.full(3, rng.uniform(1.5, 3.0))) & body] = rng.uniform(300.0, 600.0)
    lesion = np.zeros(hu.shape, dtype=bool)
    if positive:
        for _ in range(rng.integers(1, 3)):
            organ = ("liver", "spleen", "kidney_r", "kidney_l")[rng.integers(4)]
            centre, radii, value = organs[organ]
            radius = min(rng.uniform(6.0, 12.0), 0.6 * float(radii.min()))
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            offset = direction * rng.uniform(0.0, 0.5) * (radii - radius)
            sphere = _ellipsoid(points_mm, centre + offset, np.full(3, radius)) & masks[organ]
            contrast = rng.uniform(25.0, 40.0) * (1 if rng.random() < 0.5 else -1)
            hu[sphere] = value + contrast
            lesion |= sphere
    hu += rng.uniform(-15.0, 15.0)                                      # calibration offset
    hu += rng.normal(0.0, rng.uniform(15.0, 20.0), hu.shape).astype(np.float32)
    return hu, lesion


def file_grid(orientation: str, spacing_ras_mm: np.ndarray, fov_mm: np.ndarray = FOV_MM) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a file whose axes follow `orientation` and cover `fov_mm` centred on 0."""
    axes = ORIENTATIONS[orientation]                      # world axis w = axes @ file axis
    file_spacing = np.abs(axes.T) @ spacing_ras_mm        # spacing per file axis
    file_fov = np.abs(axes.T) @ np.asarray(fov_mm, dtype=float)
    shape = tuple(int(round(f / s)) for f, s in zip(file_fov, file_spacing))
    affine = np.eye(4)
    affine[:3, :3] = axes * file_spacing[None, :]
    # Centre the grid on the world origin: the middle voxel maps to 0.
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return shape, affine


def write_demo_volumes(out: str | Path, n_patients: int = 40, seed: int = 0, spacing_scale: float = 1.0,
                       hard: bool = False) -> Path:
    """Write the cohort under `out` (volumes/, truth/, manifest.csv); returns the manifest path.
    `spacing_scale` > 1 makes coarser (smaller) scans, e.g. for tests; `hard`: the hard cohort."""
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(HARD_ORIENTATIONS if hard else ORIENTATIONS)
    rows = []
    for n in range(n_patients):
        positive = n % 2 == 1
        volume_id = f"VOL-{n:03d}"
        if hard:
            spacing = np.array([rng.uniform(0.7, 1.1)] * 2 + [rng.uniform(1.5, 3.5)]) * spacing_scale
        else:
            spacing = np.array([rng.uniform(1.2, 2.4)] * 2 + [rng.uniform(2.0, 5.0)]) * spacing_scale
        shape, affine = file_grid(names[n % len(names)], spacing, HARD_FOV_MM if hard else FOV_MM)
        index = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1).astype(np.float64)
        points = index @ affine[:3, :3].T + affine[:3, 3]
        hu, lesion = (hard_phantom if hard else phantom)(points, rng, positive)
        write_nifti(out / "volumes" / f"{volume_id}.nii.gz", np.rint(hu).astype(np.int16), affine, dtype=np.int16)
        write_nifti(out / "truth" / f"{volume_id}_lesion.nii.gz", lesion.astype(np.uint8), affine, dtype=np.uint8)
        rows.append([volume_id, f"volumes/{volume_id}.nii.gz", f"P{n:03d}", "lesion" if positive else "normal",
                     "demo_ct_hard" if hard else "demo_ct", "CT", f"truth/{volume_id}_lesion.nii.gz"])
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["volume_id", "path", "patient_id", "label", "cohort", "modality", "truth_mask"])
            writer.writerows(rows)
    return manifest
