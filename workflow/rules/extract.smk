if not BATCHED:

    rule extract:
        """Patches listed in coords.h5 -> encoder -> features/{encoder}/{slide}.h5."""
        input:
            "tiles/{slide}.coords.h5",
        output:
            f"features/{ENCODER}/{{slide}}.h5",
        params:
            config_hash=stage_hash("extract"),
        log:
            "logs/snakemake/extract/{slide}.log",
        benchmark:
            "benchmarks/extract/{slide}.tsv"
        # The encoder uses every core it is given; locally this runs one extraction at a time.
        threads: MACHINE_CORES
        resources:
            gpu=GPU,
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} extract {COMMON} --out . --slides {wildcards.slide:q} "
            "--no-progress > {log:q} 2>&1"

else:

    rule extract:
        """The tile batch's slides (less those it failed) -> features/{encoder}/{slide}.h5, one
        encoder load for the batch, and a batch record."""
        input:
            batch_record("tile", "{batch}"),
        output:
            "batches/extract/{batch}.json",
        params:
            config_hash=batch_stage_hash("extract"),
            slides=batch_slides_arg,
            token=batch_token("extract", features_path),
        log:
            "logs/snakemake/extract/batches/{batch}.log",
        benchmark:
            "benchmarks/extract/batches/{batch}.tsv"
        threads: MACHINE_CORES
        resources:
            gpu=GPU,
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt * SLIDES_PER_JOB,
        shell:
            "OMP_NUM_THREADS={threads} {CLI} extract {COMMON} --out . --slides {params.slides:q} "
            "--after-batch {input:q} --batch-record {output:q} --batch-token {params.token:q} "
            "--no-progress > {log:q} 2>&1"
