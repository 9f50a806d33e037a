DETECTOR = CFG.detect.train.detector
DETECTOR_MODEL = f"detect/{DETECTOR}/model/config.json"


def detect_done_path(slide):
    # Written last by the detect stage: candidates, CSV, GeoJSON, MIDOG JSON and summary are complete.
    return f"detect/{DETECTOR}/{slide}.done.json"


rule train_detector:
    """One detector over the manifest's annotated slides (patient-level train/validation split,
    early stopping); model.safetensors first, config.json last (the target)."""
    output:
        DETECTOR_MODEL,
    params:
        model=DETECTOR,
        config_hash=stage_hash("train-detector"),
        rows_hash=hashlib.sha256(
            json.dumps([[r.slide_id, str(r.path), r.patient_id, r.mpp] for r in INCLUDED]).encode()
        ).hexdigest()[:16],
        slides=",".join(SLIDES),
    log:
        f"logs/snakemake/detect/{DETECTOR}/train.log",
    benchmark:
        f"benchmarks/detect/{DETECTOR}/train.tsv"
    threads: MACHINE_CORES
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    shell:
        "OMP_NUM_THREADS={threads} {CLI} train-detector {COMMON} --run . --model {params.model:q} "
        "--slides {params.slides:q} > {log:q} 2>&1"


rule detect:
    """Tiled whole-slide detection over tissue -> QuPath GeoJSON, CSV, MIDOG JSON, summary (hotspot)."""
    input:
        DETECTOR_MODEL,
    output:
        f"detect/{DETECTOR}/{{slide}}.done.json",
    params:
        model=DETECTOR,
        config_hash=stage_hash("detect"),
        row_hash=lambda wc: slide_row_hash(wc.slide),
    log:
        f"logs/snakemake/detect/{DETECTOR}/{{slide}}.log",
    benchmark:
        f"benchmarks/detect/{DETECTOR}/{{slide}}.tsv"
    threads: 1
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    shell:
        "OMP_NUM_THREADS={threads} {CLI} detect {COMMON} --run . --model {params.model:q} "
        "--slides {wildcards.slide:q} --no-progress > {log:q} 2>&1"
