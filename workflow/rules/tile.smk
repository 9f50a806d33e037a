if not BATCHED:

    rule tile:
        """Tissue detection + µm-exact grid -> tiles/{slide}.coords.h5 (+ tissue GeoJSON, QC PNG)."""
        input:
            # The slide file is an input only when it exists: a missing file must fail this slide's
            # job with the stage's clear message, not abort the whole DAG.
            lambda wc: [SLIDES[wc.slide].path] if os.path.exists(SLIDES[wc.slide].path) else [],
        output:
            "tiles/{slide}.coords.h5",
        params:
            config_hash=stage_hash("tile"),
            row_hash=lambda wc: slide_row_hash(wc.slide),
        log:
            "logs/snakemake/tile/{slide}.log",
        benchmark:
            "benchmarks/tile/{slide}.tsv"
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=lambda wc, attempt: 30 * attempt,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} tile {COMMON} --out . --slides {wildcards.slide:q} "
            "--no-progress > {log:q} 2>&1"

else:

    rule tile:
        """K slides of one cohort in one job -> their tiles/{slide}.coords.h5 and a batch record."""
        input:
            lambda wc: [SLIDES[s].path for s in BATCHES[wc.batch]["slides"] if os.path.exists(SLIDES[s].path)],
        output:
            "batches/tile/{batch}.json",
        params:
            config_hash=batch_stage_hash("tile"),
            rows_hash=batch_rows_hash,
            slides=batch_slides_arg,
            token=batch_token("tile", lambda s: f"tiles/{s}.coords.h5"),
        log:
            "logs/snakemake/tile/batches/{batch}.log",
        benchmark:
            "benchmarks/tile/batches/{batch}.tsv"
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=lambda wc, attempt: 30 * attempt * SLIDES_PER_JOB,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} tile {COMMON} --out . --slides {params.slides:q} "
            "--batch-record {output:q} --batch-token {params.token:q} --no-progress > {log:q} 2>&1"
