"""Manifest, pipeline config and target lists. Parsing is done by the library, not re-implemented."""

import csv
import dataclasses
import glob
import hashlib
import json
import os
import shlex

from stages import get_stage
from wsi_pipeline.run.names import NAME_CHARS
from wsi_pipeline.run.validation import validate_run_inputs

MANIFEST_PATH = os.path.abspath(config["manifest"])
PIPELINE_CONFIG = os.path.abspath(config["pipeline_config"]) if config.get("pipeline_config") else ""

# The library's full validation first, before any job starts: every problem of the manifest and the
# config at once (rows and fields named), names that become paths and shell words (slide_id,
# cohort, encoder, models: wsi_pipeline.run.names), and the model names against their registries.
MANIFEST, CFG = validate_run_inputs(MANIFEST_PATH, PIPELINE_CONFIG or None, model=config.get("model") or None,
                                    model_key="workflow config model", train=bool(config.get("train", True)))

# Then each row against the published row schema (manifests/schema.json), which says the same.
_ROW_SCHEMA = os.path.join(workflow.basedir, "..", "manifests", "schema.json")
with open(MANIFEST_PATH, newline="", encoding="utf-8-sig") as _fh:
    for _row in csv.DictReader(_fh):
        # An empty optional cell means "not given" (mpp: read it from the file; slide_id/volume_id:
        # the other column names the row): not a value to validate.
        validate({k.strip(): v.strip() for k, v in _row.items()
                  if k is not None and isinstance(v, str)
                  and not (k.strip() in ("mpp", "slide_id", "volume_id", "truth_mask", "frame") and v.strip() == "")},
                 _ROW_SCHEMA)


def previously_failed():
    """Slides whose tile or extract job failed in an earlier run of this run folder (the stages'
    failure records, RUN/failures/{stage}/{slide_id}.json; the working directory is RUN), and whose
    record still describes the manifest's file: a slide fixed or replaced since is tried again."""
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.summary import excluded_failures

    return excluded_failures(MANIFEST, RunFolder(".").failures())


# exclude_failed: the user's explicit choice to go on without the slides that failed before, instead
# of fixing them or removing them from the manifest. Without it, a failed slide keeps its cohort
# from training (train needs every slide's features), and `wsi-pipeline run` says so. On a first
# run the failures are known only after tile/extract: `wsi-pipeline run` then runs the workflow
# once more, which leaves them out here.
EXCLUDED = previously_failed() if config.get("exclude_failed", False) else []
INCLUDED = [r for r in MANIFEST if r.slide_id not in EXCLUDED]
SLIDES = {r.slide_id: r for r in INCLUDED}
COHORTS = sorted({r.cohort for r in INCLUDED})
ENCODER = CFG.extract.encoder
MODEL = config.get("model") or CFG.train.model
GPU = 1 if config.get("gpu") else 0


def _machine_cores():
    """Threads for the rules that use a whole machine: every core of a local run (`--cores`; the local
    profile says all). A cluster run has no --cores (workflow.cores raises): 1 there, unless the
    profile's set-threads sizes the rule (the slurm profile does for extract, train, segment and
    train_detector, with cpus_per_task to match)."""
    from snakemake.exceptions import WorkflowError

    try:
        return workflow.cores
    except WorkflowError:
        return 1


MACHINE_CORES = _machine_cores()

# `wsi-pipeline run` passes the CLI as shell-quoted words; split and requote them so whatever the
# config holds reaches the shell as a plain word list (never a substitution or a second command).
CLI = " ".join(shlex.quote(w) for w in shlex.split(str(config.get("cli", "wsi-pipeline"))))
_CFG_ARG = f"--config {shlex.quote(PIPELINE_CONFIG)}" if PIPELINE_CONFIG else ""
# Arguments every stage command shares. Rules use it as a global in `shell:`, not as a param:
# pointing at another manifest (e.g. one more slide) must not rerun the finished slides. What a
# job depends on is in its params instead: the slide's own row, the config sections it reads.
COMMON = f"--manifest {shlex.quote(MANIFEST_PATH)} {_CFG_ARG}"
# The left-out slides, for the stage commands that read the whole manifest (train, segment). Globals
# too: what a job trains on is in its rows_hash param, which changes only for the cohorts affected.
EXCLUDE_ARG = f"--exclude-slides {shlex.quote(','.join(EXCLUDED))}" if EXCLUDED else ""


def section_hash(*sections):
    """Params that make Snakemake rerun a rule exactly when the config sections it reads change."""
    return CFG.section_hash(*sections)


# Each rule reruns when the config sections its stage reads change (the stage's description,
# stages/). Its shell line spells the stage's CLI words (name, run-folder flag) as literals, so that
# every placeholder in it stays visibly quoted; tests/workflow/test_stage_rules.py checks they match.
def stage_hash(name):
    stage = get_stage(name)
    plain = section_hash(*stage.sections)
    if not stage.volume_sections:
        return plain
    # Per row: a volume's job also reruns when the `volumes` section changes; a slide's hash is the
    # one it always had, so changing volume settings reruns no slide.
    with_volumes = section_hash(*stage.sections, *stage.volume_sections)
    return lambda wc: with_volumes if SLIDES[wc.slide].is_volume else plain


def slide_row_hash(slide):
    r = SLIDES[slide]
    frame = f"|frame={r.frame}" if r.frame is not None else ""   # another frame: another volume
    return hashlib.sha256(f"{r.path}|{r.mpp}{frame}".encode()).hexdigest()[:16]


def cohort_slides(cohort):
    return [r.slide_id for r in INCLUDED if r.cohort == cohort]


def cohort_rows_hash(cohort):
    rows = [[r.slide_id, r.patient_id, r.label] for r in INCLUDED if r.cohort == cohort]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def trainable():
    return bool(config.get("train", True)) and all(r.label for r in INCLUDED)


def features_path(slide):
    return f"features/{ENCODER}/{slide}.h5"


# --- Several slides per job (cluster.slides_per_job K > 1; `wsi-pipeline run --slides-per-job K`) ---
# Each cohort's slides, in manifest order, are cut into batches of K; one tile, one extract and one
# heatmap job per batch run its slides one after the other in one process and leave a batch record
# (stages/batch_record.py). Snakemake sees only the records; the slides' outputs and failure records
# are those of the per-slide rules. A record is trusted only while it holds: when one of its slides
# lost its output, or a slide failed (tried again each run, as a per-slide job is), the job's
# `token` param changes and Snakemake runs it again; the stage skips the slides that are complete.
SLIDES_PER_JOB = int(config.get("slides_per_job") or CFG.cluster.slides_per_job)
BATCHED = SLIDES_PER_JOB > 1


def _cut_batches():
    batches = {}
    for cohort in sorted({r.cohort for r in MANIFEST}):
        # Every manifest row of the cohort: leaving failed slides out (--exclude-failed) keeps the
        # batches (their names and rows) as they were, so nothing finished runs again.
        ids = [r.slide_id for r in MANIFEST if r.cohort == cohort]
        for n, start in enumerate(range(0, len(ids), SLIDES_PER_JOB)):
            members = [s for s in ids[start:start + SLIDES_PER_JOB] if s in SLIDES]
            if members:
                batches[f"{cohort}-{n:04d}"] = {"cohort": cohort, "rows": ids[start:start + SLIDES_PER_JOB],
                                                 "slides": members}
    return batches


BATCHES = _cut_batches() if BATCHED else {}


def batch_record(stage, batch):
    return f"batches/{stage}/{batch}.json"


def cohort_batches(cohort):
    return [b for b, v in BATCHES.items() if v["cohort"] == cohort]


def batch_stage_hash(name):
    """stage_hash for a batch: a volume's hash where the batch holds volumes (their rule reruns
    when the `volumes` section changes), the slides' one otherwise."""
    per_row = stage_hash(name)
    if not callable(per_row):
        return per_row
    from types import SimpleNamespace

    return lambda wc: "+".join(sorted({per_row(SimpleNamespace(slide=s)) for s in BATCHES[wc.batch]["slides"]}))


def batch_slides_arg(wc):
    return ",".join(BATCHES[wc.batch]["slides"])


def batch_rows_hash(wc):
    by_id = {r.slide_id: r for r in MANIFEST}
    rows = [[s, str(by_id[s].path), by_id[s].mpp, by_id[s].frame] for s in BATCHES[wc.batch]["rows"]]
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def batch_token(stage, output_of):
    """The `token` param of a batch job: the token its record holds while the record holds (every
    slide finished and still has its output, or an upstream batch failed it), else a new one."""
    def token(wc):
        path = batch_record(stage, wc.batch)
        try:
            mtime = os.stat(path).st_mtime_ns
            with open(path, encoding="utf-8") as fh:
                record = json.load(fh)
            finished = set(record["done"]) | set(record["skipped"])
            upstream_failed = set(record.get("upstream_failed", []))
            held = all(s in upstream_failed or (s in finished and os.path.exists(output_of(s)))
                       for s in BATCHES[wc.batch]["slides"])
            if held and not record["failed"]:
                return str(record.get("token", ""))
            return f"stale@{mtime}"
        except FileNotFoundError:
            return "new"
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable"
    return token


def train_inputs(cohort):
    if BATCHED:
        return [batch_record("extract", b) for b in cohort_batches(cohort)]
    return [features_path(s) for s in cohort_slides(cohort)]


def all_features_inputs():
    if BATCHED:
        return [batch_record("extract", b) for b in BATCHES]
    return [features_path(s) for s in SLIDES]


def metrics_path(cohort):
    return f"mil/{MODEL}/{cohort}/metrics.json"


def all_targets():
    targets = all_features_inputs()
    if trainable():
        targets += [metrics_path(c) for c in COHORTS]
        if config.get("heatmaps", True):
            targets += ([batch_record(f"heatmap/{MODEL}", b) for b in BATCHES] if BATCHED
                        else [heatmap_done_path(s) for s in SLIDES])
        if config.get("segment", False):
            targets.append(SEGMENT_DONE)
    if config.get("detect", False):
        targets += [detect_done_path(s) for s in SLIDES]
    return targets
