"""The run's shell around the science: what a run is told and where it writes.

    config.py      the YAML config, one dataclass per section, resolved and hashed
    manifest.py    the manifest CSV -> records; same_file.py: one image listed under two ids
    names.py       ids and names validated before they become paths or shell words
    folder.py      the run folder's layout (RUN/...) and its failures.csv
    lock.py        one `wsi-pipeline run` per run folder
    validation.py  `wsi-pipeline validate`: a manifest and config checked before a run
    summary.py     what `wsi-pipeline run` prints at its end
"""
