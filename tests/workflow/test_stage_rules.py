"""The workflow's rules and the CLI come from one list of stages (stages.STAGES): every stage the
workflow runs has a rule whose shell line calls that stage's subcommand with its run-folder flag and
whose config hash covers the stage's config sections; and the CLI has a subcommand per stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stages import STAGE_NAMES, get_stage
from wsi_pipeline.cli import build_parser

RULES = Path(__file__).resolve().parents[2] / "workflow" / "rules"


@pytest.mark.parametrize("name", [n for n in STAGE_NAMES if (RULES / f"{n}.smk").is_file()])
def test_rule_calls_the_stage_as_described(name):
    stage = get_stage(name)
    text = (RULES / f"{name}.smk").read_text()
    assert re.search(rf"\{{CLI\}} {stage.name} \{{COMMON\}} {stage.run_flag} \. ", text), text
    assert f'config_hash=stage_hash("{name}")' in text


def test_cli_has_a_subcommand_per_stage_with_its_arguments():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in STAGE_NAMES:
        stage = get_stage(name)
        flags = {f for action in sub.choices[name]._actions for f in action.option_strings}
        for a in stage.args:
            assert set(a.flags) <= flags, (name, a.flags)
        assert stage.run_flag in flags
