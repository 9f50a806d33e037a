def heatmap_done_path(slide):
    # Written last by the heatmap stage: the PNG/TIFF/GeoJSON/top-k outputs are complete.
    return f"heatmaps/{MODEL}/{slide}.done.json"


if not BATCHED:

    rule heatmap:
        """Fold-ensemble per-patch scores -> PNG overlay, pyramidal TIFF, QuPath GeoJSON, top-k patches."""
        input:
            features=lambda wc: features_path(wc.slide),
            metrics=lambda wc: metrics_path(SLIDES[wc.slide].cohort),
        output:
            f"heatmaps/{MODEL}/{{slide}}.done.json",
        params:
            model=MODEL,
            config_hash=stage_hash("heatmap"),
        log:
            f"logs/snakemake/heatmap/{MODEL}/{{slide}}.log",
        benchmark:
            f"benchmarks/heatmap/{MODEL}/{{slide}}.tsv"
        threads: 1
        resources:
            gpu=GPU,
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=lambda wc, attempt: 60 * attempt,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} heatmap {COMMON} --run . --model {params.model:q} "
            "--slides {wildcards.slide:q} --no-progress > {log:q} 2>&1"

else:

    rule heatmap:
        """The batch's slides, one fold ensemble load -> their heatmaps and a batch record."""
        input:
            features=batch_record("extract", "{batch}"),
            metrics=lambda wc: metrics_path(BATCHES[wc.batch]["cohort"]),
        output:
            f"batches/heatmap/{MODEL}/{{batch}}.json",
        params:
            model=MODEL,
            config_hash=batch_stage_hash("heatmap"),
            slides=batch_slides_arg,
            token=batch_token(f"heatmap/{MODEL}", heatmap_done_path),
        log:
            f"logs/snakemake/heatmap/{MODEL}/batches/{{batch}}.log",
        benchmark:
            f"benchmarks/heatmap/{MODEL}/batches/{{batch}}.tsv"
        threads: 1
        resources:
            gpu=GPU,
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=lambda wc, attempt: 60 * attempt * SLIDES_PER_JOB,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} heatmap {COMMON} --run . --model {params.model:q} "
            "--slides {params.slides:q} --after-batch {input.features:q} --batch-record {output:q} "
            "--batch-token {params.token:q} --no-progress > {log:q} 2>&1"
