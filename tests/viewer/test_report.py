"""The run report's sections on a run folder written with the stages' own writers: a 3-class cohort
(classification_metrics, fold histories), a detection summary (detection.outputs.summarise), a
failure record (RunFolder.record_failure): each appears, values escaped, and the page parses."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser

import numpy as np

from wsi_pipeline.detection.outputs import summarise
from wsi_pipeline.io import write_json_atomic
from wsi_pipeline.report import build_report
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.training.metrics import classification_metrics

CLASSES = ["a", "b", "c"]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _multiclass_run(run):
    rng = np.random.default_rng(0)
    n = 30
    y = np.arange(n) % 3
    probs = rng.dirichlet([1, 1, 1], n) * 0.5
    probs[np.arange(n), y] += 0.5
    folder = RunFolder(run).mil_dir("abmil", "c3")
    folder.mkdir(parents=True)
    rows = [[f"S{i:02d}", f"P{i // 2:02d}", "c3", i % 2, CLASSES[y[i]], *probs[i]] for i in range(n)]
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "cohort", "fold", "label", *[f"prob_{c}" for c in CLASSES]])
        w.writerows(rows)
    groups = [r[1] for r in rows]
    folds = []
    for k in range(2):
        sel = np.arange(n) % 2 == k
        folds.append({"fold": k, "best_epoch": 3, **classification_metrics(y[sel], probs[sel], n_bootstrap=50,
                                                                          groups=np.array(groups)[sel])})
        (folder / f"fold_{k}").mkdir()
        write_json_atomic(folder / f"fold_{k}" / "config.json", {
            "fold": k, "best_epoch": 3, "epochs_run": 5, "stopped_early": True,
            "train_slide_ids": ["x"] * 10, "val_slide_ids": ["y"] * 5, "test_slide_ids": ["z"] * 15,
            "history": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e} for e in range(1, 6)],
            "versions": {"torch": "2.14.1"}})
    write_json_atomic(folder / "metrics.json", {
        "model": "abmil", "cohort": "c3", "classes": CLASSES, "n_folds": 2, "auc": "one-vs-rest macro ROC AUC",
        "ci": "test", "pooled": {**classification_metrics(y, probs, n_bootstrap=50, groups=groups), "n_patients": 15},
        "folds": folds})


def test_every_section_from_the_stages_writers(tmp_path):
    run = tmp_path / "run"
    _multiclass_run(run)
    det = RunFolder(run).detect_file("det", "S00", "summary.json")
    write_json_atomic(det, summarise("S00", {"mitosis": 3, "nucleus": 40}, np.array([[10.0, 10.0], [20, 20], [900, 900]]),
                                     0.5, 2.0, {"mitosis": 0.5, "nucleus": 0.5}, "mitosis"))
    RunFolder(run).record_failure("tile", "S99", "cannot open <slide> & co")
    (run / "config.yaml").write_text("train:\n  model: abmil\n")
    index = build_report(run)
    html = index.read_text()
    parser = _Collect()
    parser.feed(html)
    text = " ".join(parser.text)
    assert parser.tags.count("svg") >= 4            # ROC, PR (one curve per class), confusion, loss
    assert "abmil on c3" in text and "one-vs-rest macro ROC AUC" in text
    assert html.count("fold 0 train") >= 1 and "stopped early" in text
    assert "mitotic density /mm²" in text and "1.5" in text      # 3 mitoses on 2 mm²
    assert "cannot open <slide> & co" in text and "<slide>" not in html   # shown, and escaped
    assert "S99" in text and "failures (1)" in text
    assert "train:\n  model: abmil" in text and "torch 2.14.1" in text
    # The 30 slides of the predictions, and S99 that failed before it had any output.
    assert html.count('<tr data-text="s') == 30 and html.count('<tr class="failed" data-text="s99') == 1
    assert json.loads((run / "report" / "run.json").read_text())["cohorts"] == [{"model": "abmil", "cohort": "c3"}]
