#!/usr/bin/env bash
# `make test`: the whole suite in two pytest processes started together.
#  - tests/workflow/test_slurm.py alone: its run mostly waits on the SLURM plugin's polling (~1 s of
#    CPU per 10 s), so it runs beside the rest instead of holding a worker.
#  - everything else on three xdist workers, one file each at a time (module fixtures stay in one
#    process): many tests wait on subprocesses (Snakemake jobs, CLI calls), so a third worker fills
#    the two cores while the others wait. One torch thread each: OpenMP pools on shared cores
#    spin-wait on each other (BENCHMARKS.md, "Threads").
# Exit status: non-zero when either fails; the SLURM test's output is printed after the rest.
set -uo pipefail
PY=${PY:-.venv/bin/python}
WORKERS=${WSI_PIPELINE_TEST_WORKERS:-3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export OMP_NUM_THREADS=1

"$PY" -m pytest -q -p no:cacheprovider --basetemp "$scratch/slurm" tests/workflow/test_slurm.py \
    > "$scratch/slurm.log" 2>&1 &
slurm_pid=$!
"$PY" -m pytest -q -n "$WORKERS" --dist loadfile --basetemp "$scratch/main" \
    --ignore tests/workflow/test_slurm.py "$@" tests
main_rc=$?
wait "$slurm_pid"
slurm_rc=$?
echo "--- tests/workflow/test_slurm.py (run beside the rest) ---"
cat "$scratch/slurm.log"
if [ "$main_rc" -ne 0 ] || [ "$slurm_rc" -ne 0 ]; then
    echo "make test: FAILED (suite exit $main_rc, SLURM test exit $slurm_rc)"
    exit 1
fi
