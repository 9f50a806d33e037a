"""The encoder catalog: README table and configs/encoders/ presets equal what the registry generates,
each preset is a valid config matching its entry, and `wsi-pipeline encoders [NAME]` prints them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_pipeline.cli import main
from wsi_pipeline.encoders import catalog, get_spec
from wsi_pipeline.run.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_readme_block_is_generated_from_the_registry():
    block = catalog.readme_block_of((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block == catalog.readme_block(), (
        "README.md's encoder table is out of date: python -m wsi_pipeline.encoders.catalog --write")
    for name in catalog.primary_names():
        assert f"| {name}" in block


def test_presets_are_generated_valid_and_match_the_registry():
    assert catalog.stale_files(ROOT) == [], "regenerate: python -m wsi_pipeline.encoders.catalog --write"
    presets = sorted((ROOT / catalog.PRESETS_DIR).glob("*.yaml"))
    with_tiling = [n for n in catalog.primary_names() if catalog.has_preset(get_spec(n))]
    assert [p.stem for p in presets] == sorted(with_tiling) and "vim4path_s" in with_tiling
    for path in presets:
        cfg = load_config(path)
        spec = get_spec(path.stem)
        assert cfg.extract.encoder == spec.name
        assert cfg.tiling.target_mpp == spec.native_mpp
        assert cfg.tiling.patch_size_px == spec.recommended_patch_px


def test_check_reports_a_stale_readme_and_write_fixes_it(tmp_path):
    (tmp_path / "README.md").write_text(f"intro\n{catalog.README_START}\nold\n{catalog.README_END}\nend\n")
    (tmp_path / catalog.PRESETS_DIR).mkdir(parents=True)
    (tmp_path / catalog.PRESETS_DIR / "gone.yaml").write_text("extract: {encoder: gone}\n")
    assert catalog.main(["--check", "--root", str(tmp_path)]) == 1
    assert catalog.main(["--write", "--root", str(tmp_path)]) == 0
    assert catalog.main(["--check", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith(f"{catalog.README_END}\nend\n") and "old" not in text
    assert not (tmp_path / catalog.PRESETS_DIR / "gone.yaml").exists()


def test_cli_table_and_one_entry(capsys):
    assert main(["encoders"]) == 0
    table = capsys.readouterr().out
    for name in catalog.primary_names():
        assert name in table
    assert "configs/encoders/vim4path_s.yaml" in table

    assert main(["encoders", "vim4path_ti_plus"]) == 0
    text = capsys.readouterr().out
    for field in ("out_dim", "resize_px", "recommended_patch_px", "weights_license", "files", "reference"):
        assert field in text
    snippet = text.split("the file you downloaded):\n", 1)[1].split("preset:")[0]
    cfg = config_from_dict(yaml.safe_load(snippet))
    assert (cfg.extract.encoder, cfg.tiling.target_mpp, cfg.tiling.patch_size_px) == ("vim4path_ti_plus", 1.0, 224)


def test_cli_unknown_encoder_is_exit_2(capsys):
    assert main(["encoders", "no_such_encoder"]) == 2
    assert "unknown encoder 'no_such_encoder'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["stain_texture", "resnet50_trunc"])
def test_snippet_without_authors_tiling_has_only_extract_lines(name):
    data = yaml.safe_load(catalog.config_snippet(get_spec(name)))
    assert list(data) == ["extract"]
    assert data["extract"]["checkpoint"] == ("none" if name == "stain_texture" else "/path/to/weights.safetensors")
