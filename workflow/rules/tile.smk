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
