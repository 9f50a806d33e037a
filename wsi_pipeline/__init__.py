"""wsi-pipeline: slide -> coords.h5 -> features.h5 -> bag -> model -> scores -> exports.

The folders follow the data (imports only point downwards; tests/test_layering.py checks):

    slides/      reading a whole-slide image (OpenSlide / tiffslide), its file identity
    volumes/     reading CT/MR volumes and their 2.5-D instances (the radiology source)
    tiling/      slide -> RUN/tiles/{id}.coords.h5: tissue mask (tissue.py), patch grid (grid.py),
                 the coords file (coords_h5.py)
    encoders/    patch encoders, one registry (kept at this path: `python -m
                 wsi_pipeline.encoders.catalog` and the generated configs/encoders/*.yaml name it)
    features/    coords.h5 -> RUN/features/{encoder}/{id}.h5: patch reading (patches.py), one
                 slide's extraction (extractor.py), the features file (features_h5.py), what a
                 features file was made from (provenance.py)
    training/    features -> bags -> CV folds of a MIL model
    models/, ssm/  the networks (tensors in, tensors out) and the selective-scan core under them
    exports/, interop/, segmentation/, detection/, report/, viewer/   what a run hands on
    run/         the run's shell: config, manifest, names, the run folder, its lock, input
                 validation, the end-of-run summary
    demo/        synthetic slide and volume cohorts
    cli.py       wiring: the `wsi-pipeline` command, built from the stages (stages/)

Left at this root because every layer uses them: errors.py (the exception types), io.py (atomic
writes), sources.py (the protocol a slide and a volume share), devices.py (a device name -> torch).

`from wsi_pipeline import create_encoder, create_aggregator, open_slide` works; each loads its
package on first use, so `import wsi_pipeline` stays light (no torch).
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "create_encoder": "wsi_pipeline.encoders",
    "create_aggregator": "wsi_pipeline.models.mil",
    "open_slide": "wsi_pipeline.slides",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
