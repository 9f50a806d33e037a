SEGMENT_DONE = "segment/metrics.csv"


rule segment:
    """Weak lesion segmentation (FMaMIL stage 2) over the whole manifest: the fold ensembles' patch
    CAMs -> pseudo-labels -> one segmenter -> per-slide lesion masks (TIFF + QuPath GeoJSON).

    One job, because the segmenter learns from every slide. Inside it, finished slides and an
    unchanged segmenter are skipped, so a rerun after a failure redoes only what is missing; its
    per-slide failures go to failures.csv like every other stage's."""
    input:
        features=all_features_inputs(),
        metrics=[metrics_path(c) for c in COHORTS],
    output:
        SEGMENT_DONE,
    params:
        model=MODEL,
        config_hash=stage_hash("segment"),
        rows_hash=hashlib.sha256(
            json.dumps([[r.slide_id, str(r.path), r.label, r.mpp] for r in INCLUDED]).encode()
        ).hexdigest()[:16],
    log:
        f"logs/snakemake/segment/{MODEL}.log",
    benchmark:
        f"benchmarks/segment/{MODEL}.tsv"
    threads: MACHINE_CORES
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    shell:
        "OMP_NUM_THREADS={threads} {CLI} segment {COMMON} --run . --model {params.model:q} "
        "{EXCLUDE_ARG} --no-progress > {log:q} 2>&1"
