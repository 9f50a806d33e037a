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
