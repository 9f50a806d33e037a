"""Nothing from a manifest, config or CLI flag reaches a shell unquoted, and model names are checked
against their registries before any job runs. `wsi-pipeline run` validates its inputs itself:
every problem listed, exit 2 (README), nothing created."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk")) + [REPO / "workflow" / "Snakefile"]
# Words the rules build in Python already shell-quoted (workflow/rules/common.smk), and numbers.
PREQUOTED = {"CLI", "COMMON", "EXCLUDE_ARG", "threads"}
INJECTION = "$(touch pwned)"


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def prepared_run(tmp_path):
    """A one-cohort manifest whose tile and extract outputs already exist (empty files), so the
    workflow's next job is `train`: with an injected model name, its shell line runs the command."""
    manifest = tmp_path / "m.csv"
    rows = "".join(f"S{i},S{i}.svs,P{i},{'pos' if i % 2 else 'neg'},c1\n" for i in range(4))
    manifest.write_text("slide_id,path,patient_id,label,cohort\n" + rows)
    run = tmp_path / "run"
    for i in range(4):
        for rel in (f"tiles/S{i}.coords.h5", f"features/resnet50_trunc/S{i}.h5"):
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_bytes(b"")
    return tmp_path, manifest, run


def _pwned(root: Path) -> list[Path]:
    return list(root.rglob("pwned")) + [p for p in (Path.cwd() / "pwned",) if p.exists()]


def _shell_strings(text: str) -> list[str]:
    """The string literals of every `shell:` block of a rules file."""
    blocks = re.findall(r"^\s*shell:\s*\n((?:\s+\".*\"\s*\n)+)", text, flags=re.M)
    return ["".join(re.findall(r"\"(.*)\"", b)) for b in blocks]


def test_every_shell_placeholder_is_quoted():
    checked = 0
    for path in RULES:
        for shell in _shell_strings(path.read_text()):
            for field in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", shell):
                checked += 1
                assert field in PREQUOTED or field.endswith(":q"), \
                    f"{path.name}: {{{field}}} reaches the shell unquoted"
    assert checked >= 25  # five rules' worth of placeholders were seen


def test_injected_model_in_config_runs_nothing_and_exits_2(prepared_run):
    """`train.model: "$(touch pwned)"` used to run `touch` in the train job's shell line (exit 1)."""
    root, manifest, run = prepared_run
    config = root / "evil.yaml"
    config.write_text(f'train:\n  model: "{INJECTION}"\n')
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", "run", "--manifest", str(manifest), "--config", str(config),
           "--out", str(run), "--cores", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=_env())
    assert not _pwned(root), result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.model: may hold only" in result.stderr
    assert not (run / ".snakemake").exists() and not (run / "mil").exists()


def test_injected_model_flag_is_refused_before_snakemake(prepared_run, capsys):
    root, manifest, run = prepared_run
    code = main(["run", "--manifest", str(manifest), "--out", str(run), "--cores", "1", "--model", INJECTION])
    assert not _pwned(root)
    assert code == 2
    assert "--model: may hold only" in capsys.readouterr().err
    assert not (run / ".snakemake").exists()


def test_snakefile_refuses_an_injected_model_at_parse_time(prepared_run):
    """Snakemake run directly (not through `wsi-pipeline run`): the Snakefile validates too."""
    root, manifest, run = prepared_run
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(run),
           "--cores", "1", "--dry-run", "--config", f"manifest={manifest}", f"model={INJECTION}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=_env())
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-2000:]
    assert "workflow config model: may hold only" in text and "nothing was run" in text
    assert not _pwned(root)


def test_run_with_a_bad_manifest_and_config_lists_every_problem_and_exits_2(tmp_path, capsys):
    """README: exit 2 for an invalid manifest/config. `run` used to exit 1 (Snakemake's parse error)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\nA,a.svs,P1,x,../../outside\nA,b.svs,P2,y,c1\n")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: mambamill\nextract:\n  encoder: resnet5O\nsegment:\n  model: vmunet_tny\n")
    run = tmp_path / "run"
    code = main(["run", "--manifest", str(manifest), "--config", str(config), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "5 problem(s)" in err
    assert "row 1 (slide_id 'A'): cohort may hold only" in err
    assert "row 2 (slide_id 'A'): duplicate slide_id" in err
    assert "train.model: unknown MIL aggregator 'mambamill' (did you mean mambamil" in err
    assert "extract.encoder: unknown encoder 'resnet5O'" in err and "did you mean resnet50" in err
    assert "segment.model: unknown segmenter 'vmunet_tny' (did you mean vmunet_tiny" in err
    assert not run.exists()


def test_a_timm_architecture_is_a_valid_encoder():
    from wsi_pipeline.run.config import config_from_dict
    from wsi_pipeline.run.validation import registry_problems

    assert registry_problems(config_from_dict({"extract": {"encoder": "resnet18"}})) == []
    assert registry_problems(config_from_dict({"extract": {"encoder": "stain_texture"}})) == []


def test_workflow_cli_word_list_stays_quoted(prepared_run):
    """The workflow's `cli` config is split and requoted: a `;` or `$(...)` in it is one literal word,
    never a second command (dry run: the shell lines it would run)."""
    root, manifest, run = prepared_run
    (run / "features").rename(root / "features-moved")  # so extract, with its shell line, is planned
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(run),
           "--cores", "1", "--dry-run", "--printshellcmds", "--config", f"manifest={manifest}",
           f"cli=wsi-pipeline; touch pwned $(touch pwned)"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=_env())
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if "extract --manifest" in line]
    assert lines, text[-3000:]
    assert all("'wsi-pipeline;' touch pwned '$(touch' 'pwned)'" in line for line in lines), lines
    assert not _pwned(root)


def test_a_misspelt_per_model_key_is_refused_with_the_closest_model():
    from wsi_pipeline.run.config import config_from_dict
    from wsi_pipeline.run.validation import registry_problems

    ok = config_from_dict({"train": {"per_model": {"fmamil": {"instance_loss_weight": 1.0}}}})
    assert registry_problems(ok) == []
    typo = config_from_dict({"train": {"per_model": {"fmamill": {"instance_loss_weight": 1.0}}}})
    (problem,) = registry_problems(typo)
    assert problem.startswith("train.per_model: unknown MIL aggregator 'fmamill' (did you mean fmamil")
