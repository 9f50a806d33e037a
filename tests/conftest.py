"""Shared fixtures: every test makes its own slides (small, real pyramidal TIFFs)."""

from __future__ import annotations

import os

import pytest

# Tests must never reach a model hub; CPU only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


# The longest test files first (stable order otherwise, each file kept together): under
# `make test`'s xdist workers (`--dist loadfile`) the Snakemake chains of the two workflow tests and
# the planted-signal models start at once on their own workers, and the short files fill in.
# (tests/run_suite.sh runs the SLURM cluster test in a process of its own beside them.)
LONG_FILES = ("workflow/test_workflow.py", "volumes/test_volume_workflow.py", "models/test_planted_signal.py",
              "workflow/test_slurm.py")


def _long_first(item) -> int:
    path = item.nodeid.split("::")[0]
    return next((i for i, name in enumerate(LONG_FILES) if path.endswith(name)), len(LONG_FILES))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_first)
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


SMALL = {"width_px": 2048, "height_px": 1536, "mpp": 0.5}


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """A 4-slide demo cohort (2 positive) at 2048×1536 px, 0.5 µm/px; returns the manifest path."""
    from wsi_pipeline.demo.slides import make_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    return make_demo_cohort(out, 4, width_px=SMALL["width_px"], height_px=SMALL["height_px"],
                            mpp=SMALL["mpp"], seed=1)


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory):
    """Factory: make_slide(name, **DemoSlideSpec fields) -> path of a small demo slide (cached)."""
    from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide

    folder = tmp_path_factory.mktemp("slides")
    cache = {}

    def _make(name: str = "slide", **fields):
        key = (name, tuple(sorted(fields.items())))
        if key not in cache:
            spec = DemoSlideSpec(**{**SMALL, **fields})
            path = folder / f"{name}.svs"
            write_demo_slide(path, spec)
            cache[key] = path
        return cache[key]

    return _make
