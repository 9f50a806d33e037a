import pytest

from wsi_pipeline.errors import ConfigError, ManifestError
from wsi_pipeline.run.config import Config, config_from_dict, load_config
from wsi_pipeline.run.manifest import load_manifest

HEADER = "slide_id,path,patient_id,label,cohort\n"


def _write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_manifest_resolves_relative_paths_and_mpp(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"x")
    p = _write(tmp_path, "slide_id,path,patient_id,label,cohort,mpp\nA,slides/a.svs,P1,tumor,c1,0.25\n"
                         "B,/abs/b.svs,P2,,c1,\n")
    m = load_manifest(p)
    a, b = m.records
    assert a.path == (tmp_path / "slides" / "a.svs").resolve() and a.mpp == 0.25 and a.row == 1
    assert str(b.path) == "/abs/b.svs" and b.mpp is None and b.label == ""
    assert m.select(["B"]).records == (b,)
    with pytest.raises(ManifestError, match="'Z' not in manifest"):
        m.select(["Z"])


def test_manifest_reports_every_problem_with_row_and_field(tmp_path):
    p = _write(tmp_path, HEADER + "A,a.svs,P1,tumor,c1\nA,b.svs,P2,normal,c1\n"
                                  "C,c.svs,P1,tumor,c2\nbad id,d.svs,P3,,c1\nE,,P4,x,c1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(p, require_labels=True, check_files=True)
    problems = "\n".join(info.value.problems)
    assert "row 2 (slide_id 'A'): duplicate slide_id (first at row 1)" in problems
    assert "row 3 (slide_id 'C'): patient 'P1' is in cohort 'c2' here and in 'c1' at row 1" in problems
    assert "row 4 (slide_id 'bad id'): slide_id may hold only" in problems
    assert "row 4 (slide_id 'bad id'): empty label" in problems
    assert "row 5 (slide_id 'E'): empty path" in problems
    assert "row 1 (slide_id 'A'): slide file not found" in problems


def test_manifest_missing_column_and_bad_mpp(tmp_path):
    with pytest.raises(ManifestError, match="missing column.*patient_id"):
        load_manifest(_write(tmp_path, "slide_id,path,label,cohort\nA,a,x,c\n"))
    with pytest.raises(ManifestError, match="row 1 .*mpp must be a positive number"):
        load_manifest(_write(tmp_path, "slide_id,path,patient_id,label,cohort,mpp\nA,a,P,x,c,-1\n"))
    # An extra column is kept, not refused (issue 17: one CSV for several tools); tests/interop checks
    # the warning and the `wsi` alias.
    assert load_manifest(_write(tmp_path, "slide_id,path,patient_id,label,cohort,stain\nA,a,P,x,c,he\n")
                         ).records[0].extra_columns == {"stain": "he"}
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="no slide rows"):
        load_manifest(_write(tmp_path, HEADER))


def test_config_defaults_file_and_strictness(tmp_path):
    cfg = load_config("configs/default.yaml")
    assert cfg == Config()  # the documented file states the defaults
    cfg = config_from_dict({"tiling": {"target_mpp": 1, "patch_size_px": 256}})
    assert cfg.tiling.target_mpp == 1.0 and isinstance(cfg.tiling.target_mpp, float)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) tiling.patch_size"):
        config_from_dict({"tiling": {"patch_size": 256}})
    with pytest.raises(ConfigError, match="unknown key.*tilling"):
        config_from_dict({"tilling": {}})
    with pytest.raises(ConfigError, match="tiling.patch_size_px must be an integer"):
        config_from_dict({"tiling": {"patch_size_px": "224"}})
    with pytest.raises(ConfigError, match="tissue.keep_holes must be true or false"):
        config_from_dict({"tissue": {"keep_holes": "yes"}})
    with pytest.raises(ConfigError, match="overlap_px"):
        config_from_dict({"tiling": {"overlap_px": 300}})
    with pytest.raises(ConfigError, match="slides.backend"):
        config_from_dict({"slides": {"backend": "bioformats"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert Config().section_hash("tiling") != config_from_dict(
        {"tiling": {"overlap_px": 16}}).section_hash("tiling")
