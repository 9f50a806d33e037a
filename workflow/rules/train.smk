rule train:
    """Patient-level k-fold CV of one MIL aggregator on one cohort -> mil/{model}/{cohort}/."""
    input:
        lambda wc: train_inputs(wc.cohort),
    output:
        f"mil/{MODEL}/{{cohort}}/metrics.json",
        f"mil/{MODEL}/{{cohort}}/predictions.csv",
    params:
        model=MODEL,
        config_hash=stage_hash("train"),
        rows_hash=lambda wc: cohort_rows_hash(wc.cohort),
    log:
        f"logs/snakemake/train/{MODEL}/{{cohort}}.log",
    benchmark:
        f"benchmarks/train/{MODEL}/{{cohort}}.tsv"
    threads: MACHINE_CORES
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    shell:
        "OMP_NUM_THREADS={threads} {CLI} train {COMMON} --features . --model {params.model:q} "
        "--cohort {wildcards.cohort:q} {EXCLUDE_ARG} --no-progress > {log:q} 2>&1"
