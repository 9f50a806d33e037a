"""Injected faults and bad inputs: every one gives one clear line (no traceback), the documented exit
code, no temp file left behind, and no finished output of another slide lost.

Storage faults are injected with monkeypatch (tests run as root, for whom chmod does not make a
folder read-only): writes and renames under the run folder raise the OSError a full, read-only or
forbidden disk raises. Kills are real SIGKILLs of a `wsi-pipeline` subprocess.
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.tile import run_tile
from wsi_pipeline.cli import main
from wsi_pipeline.io import TMP_MARK
from wsi_pipeline.run.config import Config, config_from_dict
from wsi_pipeline.run.manifest import Manifest, SlideRecord, load_manifest
from wsi_pipeline.tiling.coords_h5 import coords_h5_is_valid

HEADER = "slide_id,path,patient_id,label,cohort,mpp"
REPO = Path(__file__).resolve().parents[2]


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides(demo_cohort):
    """Two good demo slides (absolute paths): [(slide_id, path), ...]."""
    records = list(load_manifest(demo_cohort))[:2]
    return [(r.slide_id, r.path) for r in records]


def write_manifest(folder: Path, rows: list[str], header: str = HEADER) -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def good_rows(slides) -> list[str]:
    return [f"{sid},{p},P{i},tumor,demo," for i, (sid, p) in enumerate(slides)]


def failures_csv(run: Path) -> dict[str, dict]:
    with open(run / "failures.csv", encoding="utf-8") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def temps_under(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if TMP_MARK in p.name]


def tile_cli(manifest: Path, run: Path, *extra: str) -> int:
    return main(["tile", "--manifest", str(manifest), "--out", str(run), "--no-progress", *extra])


def assert_one_line_errors(text: str) -> None:
    assert "Traceback" not in text, text


def fail_writes(monkeypatch, run: Path, err: int, when=lambda path: True) -> None:
    """Opening a file for writing under `run`, or renaming one into it, raises OSError(`err`)
    where `when(path)` holds — what a full (ENOSPC), read-only (EROFS) or forbidden (EACCES) disk
    does. h5py opens its files in C, so an .h5 fails at the rename into place instead."""
    real_open, real_io_open, real_replace = builtins.open, io.open, os.replace
    root = str(run.resolve())

    def hit(path) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return False
        return str(p).startswith(root) and when(p)

    def raise_for(path):
        raise OSError(err, os.strerror(err), os.fsdecode(path))

    def guarded(real):
        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not isinstance(file, int) and hit(file):
                raise_for(file)
            return real(file, mode, *args, **kwargs)
        return fake_open

    def fake_replace(src, dst, *args, **kwargs):
        if hit(dst):
            raise_for(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))   # pathlib's write_text opens through io
    monkeypatch.setattr(os, "replace", fake_replace)


# -- item 6: storage faults -------------------------------------------------------------------
def test_enospc_writing_one_output_fails_that_slide_only(slides, tmp_path, monkeypatch, capsys):
    (a, _), (b, _) = slides
    run = tmp_path / "run"
    fail_writes(monkeypatch, run, errno.ENOSPC, when=lambda p: p.name == f"{a}.coords.h5")
    assert tile_cli(write_manifest(tmp_path, good_rows(slides)), run) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    fails = failures_csv(run)
    assert set(fails) == {a}
    assert "No space left on device" in fails[a]["error"] and f"{a}.coords.h5" in fails[a]["error"]
    assert "\n" not in fails[a]["error"] and "unexpected" not in fails[a]["error"]
    assert coords_h5_is_valid(run / "tiles" / f"{b}.coords.h5")
    assert not (run / "tiles" / f"{a}.coords.h5").exists()
    assert temps_under(run) == []


def test_enospc_writing_the_failure_record_still_lists_the_failure(slides, tmp_path, monkeypatch, capsys):
    rows = good_rows(slides[:1]) + ["GONE,/nonexistent/gone.svs,P9,tumor,demo,"]
    run = tmp_path / "run"
    fail_writes(monkeypatch, run, errno.ENOSPC, when=lambda p: "failures" in p.relative_to(run.resolve()).parts[:1])
    assert tile_cli(write_manifest(tmp_path, rows), run) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    assert "cannot record the failure of 'GONE': No space left on device" in out.out
    fails = failures_csv(run)          # kept in memory, written into failures.csv
    assert set(fails) == {"GONE"} and "file not found" in fails["GONE"]["error"]
    assert coords_h5_is_valid(run / "tiles" / f"{slides[0][0]}.coords.h5")
    assert temps_under(run) == []


def test_disk_full_midway_keeps_finished_outputs_and_reports_everything(slides, tmp_path, monkeypatch, capsys):
    """After the first slide, every write under RUN fails (outputs, failure records, failures.csv)."""
    (a, _), (b, _) = slides
    run = tmp_path / "run"
    done_a = run / "tiles" / f"{a}.coords.h5"
    fail_writes(monkeypatch, run, errno.ENOSPC, when=lambda p: done_a.exists())
    assert tile_cli(write_manifest(tmp_path, good_rows(slides)), run) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    assert f"FAILED slide '{b}': No space left on device" in out.out
    assert "cannot write" in out.out and "failures.csv: No space left on device" in out.out
    assert coords_h5_is_valid(done_a)
    assert not (run / "tiles" / f"{b}.coords.h5").exists()
    assert temps_under(run) == []


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_unwritable_run_folder_is_one_line_and_exit_1(err, slides, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fail_writes(monkeypatch, run, err)
    assert tile_cli(write_manifest(tmp_path, good_rows(slides)), run) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    line = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and os.strerror(err) in line[0] and "config.yaml" in line[0]
    assert list(run.iterdir()) == []


def test_unwritable_failures_csv_on_a_clean_run_is_exit_1(slides, tmp_path, monkeypatch, capsys):
    """Everything already complete, but the run folder became read-only: not silently 0."""
    manifest = write_manifest(tmp_path, good_rows(slides[:1]))
    run = tmp_path / "run"
    assert tile_cli(manifest, run) == 0
    fail_writes(monkeypatch, run, errno.EROFS, when=lambda p: p.name == "failures.csv")
    assert tile_cli(manifest, run) == 1
    out = capsys.readouterr().out
    assert "1 already complete" in out and "failures.csv: Read-only file system" in out


def test_slide_id_too_long_for_the_file_system(slides, tmp_path):
    """A 300-character slide_id (manifest validation may refuse it first): the batch survives the
    ENAMETOOLONG of its output, records it, and tiles the other slide."""
    (a, path_a), _ = slides
    long_id = "L" * 300
    records = (SlideRecord(long_id, path_a, "P1", "tumor", "demo", None, 1),
               SlideRecord(a, path_a, "P2", "tumor", "demo", None, 2))
    run = tmp_path / "run"
    report = run_tile(Manifest(tmp_path / "m.csv", records), Config(), run, progress=False)
    assert report.done == [a] and set(report.failed) == {long_id}
    # RunFolder refuses the name before the file system would (ENAMETOOLONG); either way one line.
    assert "300 characters long; at most 128" in report.failed[long_id]
    assert "unexpected" not in report.failed[long_id]
    assert "300 characters long" in failures_csv(run)[long_id]["error"]
    assert temps_under(run) == []


# -- bad slide files --------------------------------------------------------------------------
def test_zero_byte_truncated_and_non_tiff_slides_fail_one_line_each(slides, tmp_path, capsys):
    (a, path_a), _ = slides
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.svs").write_bytes(b"")
    (folder / "trunc.svs").write_bytes(path_a.read_bytes()[:4096])
    png = folder / "photo.svs"                       # a PNG with a slide's extension
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 100, 150)).save(png, format="PNG")
    rows = good_rows(slides[:1]) + [f"EMPTY,{folder / 'empty.svs'},P7,tumor,demo,",
                                    f"TRUNC,{folder / 'trunc.svs'},P8,tumor,demo,",
                                    f"PNG,{png},P9,tumor,demo,"]
    run = tmp_path / "run"
    assert tile_cli(write_manifest(tmp_path, rows), run) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    fails = failures_csv(run)
    assert set(fails) == {"EMPTY", "TRUNC", "PNG"}
    for sid, row in fails.items():
        assert row["error"].startswith(f"slide {sid!r}: ") and "\n" not in row["error"]
    assert coords_h5_is_valid(run / "tiles" / f"{a}.coords.h5")


@pytest.mark.parametrize("change", ["renamed", "deleted"])
def test_slide_gone_after_tiling_is_reported_by_extract(change, slides, tmp_path, capsys):
    (a, path_a), (b, path_b) = slides
    folder = tmp_path / "slides"
    folder.mkdir()
    local = [(sid, shutil.copy(p, folder / Path(p).name)) for sid, p in slides]
    manifest = write_manifest(tmp_path, good_rows(local))
    config = tmp_path / "config.yaml"
    config.write_text("extract: {encoder: stain_texture, checkpoint: none, num_workers: 0}\n")
    run = tmp_path / "run"
    assert tile_cli(manifest, run, "--config", str(config)) == 0
    gone = Path(local[0][1])
    gone.rename(gone.with_suffix(".moved")) if change == "renamed" else gone.unlink()
    args = ["extract", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--no-progress"]
    assert main(args) == 1
    out = capsys.readouterr()
    assert_one_line_errors(out.out + out.err)
    fails = failures_csv(run)
    assert set(fails) == {a} and fails[a]["stage"] == "extract" and "not found" in fails[a]["error"]
    assert (run / "features" / "stain_texture" / f"{b}.h5").is_file()
    assert temps_under(run) == []


# -- item 8: upsampling -----------------------------------------------------------------------
def test_target_finer_than_the_slide_is_a_slide_error_unless_allowed(slides, tmp_path, capsys):
    manifest = write_manifest(tmp_path, good_rows(slides[:1]))
    sid = slides[0][0]
    for target in (0.1, 0.01):
        config = tmp_path / "up.yaml"
        config.write_text(f"tiling: {{target_mpp: {target}}}\n")
        run = tmp_path / f"run{target}"
        assert tile_cli(manifest, run, "--config", str(config)) == 1
        error = failures_csv(run)[sid]["error"]
        assert f"tiling.target_mpp {target:g} µm/px is finer than the slide's 0.5 µm/px" in error
        assert "allow_upsampling: true" in error and "x1 must be" not in error
        assert not (run / "tiles" / f"{sid}.coords.h5").exists()
    config.write_text("tiling: {target_mpp: 0.1, allow_upsampling: true}\n")
    run = tmp_path / "allowed"
    assert tile_cli(manifest, run, "--config", str(config)) == 0
    assert coords_h5_is_valid(run / "tiles" / f"{sid}.coords.h5")
    assert_one_line_errors(capsys.readouterr().err)


def test_allow_upsampling_leaves_the_tiling_hash_unchanged():
    """Existing coords.h5 stay valid: the switch never changes an output, so it is not hashed."""
    on = config_from_dict({"tiling": {"allow_upsampling": True}})
    assert on.section_hash("tissue", "tiling") == Config().section_hash("tissue", "tiling")


# -- malformed configs and manifests: exit 2, nothing run -------------------------------------
@pytest.mark.parametrize("text, named", [
    ("tiling: {target_mpp: 0.5, bogus: 1}\n", "tiling.bogus"),
    ("tiling: {patch_size_px: 'big'}\n", "tiling.patch_size_px must be an integer"),
    ("tiling: {target_mpp: [0.5: }\n", "not valid YAML"),
    ("tiling: {target_mpp: 0}\n", "tiling.target_mpp: must be > 0"),
    ("tiling: {target_mpp: -1}\n", "tiling.target_mpp: must be > 0"),
    ("tiling: {target_mpp: .inf}\n", "tiling.target_mpp: must be finite"),
    ("tiling: {target_mpp: .nan}\n", "tiling.target_mpp: must be > 0"),
    ("tiling: {target_mpp: 1000}\n", "tiling.target_mpp: must be in [0.01, 100.0]"),
    ("tiling: {patch_size_px: 100000}\n", "tiling.patch_size_px: must be in [8, 8192]"),
    ("tiling: {allow_upsampling: 'yes'}\n", "tiling.allow_upsampling must be true or false"),
    ("tissue: {mask_mpp: .inf}\n", "tissue.mask_mpp: must be finite"),
])
def test_malformed_config_exit_2_names_the_key(text, named, slides, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    assert tile_cli(write_manifest(tmp_path, good_rows(slides[:1])), run, "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("content, named", [
    ("slide_id,path,patient_id,cohort\nA,a.svs,P1,demo\n", "missing column(s): label"),
    (f"{HEADER}\nA,a.svs,P1,t,demo,\nA,b.svs,P2,t,demo,\n", "row 2 (slide_id 'A'): duplicate slide_id"),
    ("", "missing column(s)"),
    (f"{HEADER}\n", "no slide rows"),
    (f"{HEADER}\nA,a.svs,P1,t,demo,abc\n", "row 1 (slide_id 'A'): mpp must be a positive number"),
    (f"{HEADER}\nA,a.svs,P1,t,demo,-0.5\n", "row 1 (slide_id 'A'): mpp must be a positive number"),
])
def test_malformed_manifest_exit_2_names_the_row_and_field(content, named, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content, encoding="utf-8")
    run = tmp_path / "run"
    assert tile_cli(manifest, run) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not run.exists()


def test_manifest_with_bom_and_crlf_is_read(slides, tmp_path):
    """Spreadsheet exports (UTF-8 BOM, CRLF line ends) are valid manifests, not errors."""
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(("\ufeff" + "\r\n".join([HEADER, *good_rows(slides)]) + "\r\n").encode("utf-8"))
    m = load_manifest(manifest)
    assert [r.slide_id for r in m] == [s[0] for s in slides] and m.records[0].path == Path(slides[0][1])


# -- kill -9 mid-write, then rerun ------------------------------------------------------------
_SLOW_RENAME = """
import os, sys, time
real = os.replace
def slow(src, dst, *a, **k):
    if str(dst).endswith({suffix!r}):
        time.sleep(120)                        # killed here: the temp is written, not yet renamed
    return real(src, dst, *a, **k)
os.replace = slow
from wsi_pipeline.cli import main
sys.exit(main({argv!r}))
"""


def _kill_while_writing(argv: list[str], watch: Path, suffix: str, timeout_s: float = 120) -> None:
    """Run `wsi-pipeline argv` with the rename into `*suffix` stalled; SIGKILL it as soon as its
    temp file appears in `watch`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RENAME.format(suffix=suffix, argv=argv)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while not any(TMP_MARK in p.name for p in watch.glob("*")) if watch.is_dir() else True:
            if proc.poll() is not None:
                raise AssertionError(f"exited before writing: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "no temp file appeared"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_during_tile_then_rerun(slides, tmp_path):
    sid = slides[0][0]
    manifest = write_manifest(tmp_path, good_rows(slides[:1]))
    run = tmp_path / "run"
    coords = run / "tiles" / f"{sid}.coords.h5"
    argv = ["tile", "--manifest", str(manifest), "--out", str(run), "--no-progress"]
    _kill_while_writing(argv, run / "tiles", ".coords.h5")
    assert not coords.exists()                         # the half-done output is only a temp
    assert any(TMP_MARK in p.name for p in (run / "tiles").iterdir())
    assert main(argv) == 0                             # the rerun tiles it and drops the temp
    assert coords_h5_is_valid(coords) and temps_under(run) == []

    before = coords.read_bytes()                       # a killed --force redo keeps the old output
    _kill_while_writing([*argv, "--force"], run / "tiles", ".coords.h5")
    assert coords.read_bytes() == before and coords_h5_is_valid(coords)


def test_kill_9_during_extract_then_rerun(slides, tmp_path, capsys):
    sid = slides[0][0]
    manifest = write_manifest(tmp_path, good_rows(slides[:1]))
    config = tmp_path / "config.yaml"
    config.write_text("extract: {encoder: stain_texture, checkpoint: none, num_workers: 0}\n")
    run = tmp_path / "run"
    common = ["--manifest", str(manifest), "--config", str(config), "--out", str(run), "--no-progress"]
    assert main(["tile", *common]) == 0
    features = run / "features" / "stain_texture" / f"{sid}.h5"
    _kill_while_writing(["extract", *common], features.parent, ".h5")
    assert not features.exists()
    assert main(["extract", *common]) == 0
    assert features.is_file() and temps_under(run) == []
    assert "1 done" in capsys.readouterr().out
