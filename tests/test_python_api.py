"""The README's Python example (tile -> extract -> train -> heatmap through `stages.get_stage(...).run`)
on a tiny cohort, and the CLI doing the same with its overrides recorded in RUN/configs/{stage}.yaml."""

from __future__ import annotations

import yaml

from stages import get_stage
from wsi_pipeline.cli import main
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.manifest import load_manifest

TINY = {
    "tiling": {"target_mpp": 2.0, "patch_size_px": 32},
    "extract": {"encoder": "stain_texture", "checkpoint": None},
    "train": {"model": "abmil", "folds": 2, "epochs": 2, "patience": 2, "bootstrap": 20,
              "model_args": {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}},
    "heatmap": {"exports": ["png", "geojson"], "top_k": 1},
}


def _two_patients_per_class(demo_cohort, make_slide, path):
    """The demo cohort plus another tumour slide per tumour slide, as second patients: 2-fold CV needs
    two per class. (Its own slide file: one image under two ids is refused.)"""
    lines = demo_cohort.read_text().splitlines()
    rows = [line.replace("slides/", f"{demo_cohort.parent}/slides/") for line in lines[1:]]
    tumours = [f for f in (r.split(",") for r in rows) if f[3] == "tumor"]
    extra = [",".join(["DUP" + f[0], str(make_slide(f"dup_{n}", positive=True, seed=100 + n)), "Q" + f[2], *f[3:]])
             for n, f in enumerate(tumours)]
    path.write_text("\n".join([lines[0], *rows, *extra]) + "\n")
    return path


def test_readme_python_example_then_the_cli_records_its_overrides(demo_cohort, make_slide, tmp_path, capsys):
    demo_cohort = _two_patients_per_class(demo_cohort, make_slide, tmp_path / "manifest.csv")
    manifest = load_manifest(demo_cohort)
    cfg = config_from_dict(TINY)
    run = tmp_path / "run"
    for name in ("tile", "extract"):
        report = get_stage(name).run(manifest, cfg, run, progress=False)
        assert report.ok and sorted(report.done) == sorted(r.slide_id for r in manifest), report.summary()
        assert all(p.endswith(".h5") for p in report.outputs.values())
    train = get_stage("train").run(manifest, cfg, run, progress=False)
    assert train.ok and list(train) == ["demo"] and train["demo"]["status"] == "done"
    assert 0.0 <= train["demo"]["metrics"]["auc"]["value"] <= 1.0
    heat = get_stage("heatmap").run(manifest, cfg, run, progress=False)
    assert heat.ok and set(heat.outputs) == {r.slide_id for r in manifest}
    assert all((run / "heatmaps" / "abmil" / f"{sid}.png").is_file() for sid in heat.outputs)

    # The CLI runs the same stage: finished work is skipped, and the config it ran with, overrides
    # included, is recorded per stage (device is not part of a fold's identity: folds are reused).
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    common = ["--manifest", str(demo_cohort), "--config", str(config), "--no-progress"]
    assert main(["tile", "--out", str(run), *common]) == 0
    assert "0 done, 5 already complete" in capsys.readouterr().out
    assert main(["train", "--features", str(run), "--device", "cpu", *common]) == 0
    assert "2 reused" in capsys.readouterr().out
    recorded = yaml.safe_load((run / "configs" / "train.yaml").read_text())
    assert recorded["train"]["device"] == "cpu" and recorded["train"]["epochs"] == 2
    assert yaml.safe_load((run / "configs" / "tile.yaml").read_text())["tiling"]["patch_size_px"] == 32
    assert (run / "config.yaml").is_file()      # the data stages' record, as before
