REPORT_INDEX = "report/index.html"


def report_targets():
    return [REPORT_INDEX] if config.get("report", True) else []


rule report:
    """The run report (wsi-pipeline report): RUN/report/index.html + assets, last, from every other
    target; reruns only when one of them (or the manifest's rows) changed, so a finished run's
    rerun leaves it alone. It reads failures from RUN/failures/ (the per-slide records)."""
    input:
        all_targets(),
    output:
        REPORT_INDEX,
    params:
        rows_hash=hashlib.sha256(
            json.dumps([[r.slide_id, r.patient_id, r.label, r.cohort, str(r.path)] for r in MANIFEST]).encode()
        ).hexdigest()[:16],
    log:
        "logs/snakemake/report.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "OMP_NUM_THREADS=1 {CLI} report . {COMMON} > {log:q} 2>&1"
