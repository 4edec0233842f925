#!/usr/bin/env bash
# What a GPU machine is for here, in one short run (docs/bench.md, "On a GPU"): the full-scale networks' training
# step rates (bench/gpu_steps.py), then the smoke chains of the chest X-ray, fairgen and MedMNIST studies with every
# stage on CUDA (--device auto), each with its exit status and wall time. Results and logs go to $OUT (default
# runs/gpu_check/); the smoke runs to smoke/ as `make <study> SMOKE=1` would.
#     bash bench/gpu_check.sh                 # ~12 min on one GPU (each part has its own limit); PYTHON=... for another
set -u
out=${OUT:-runs/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$out/machine.txt"
timeout 180 $py bench/gpu_steps.py --out "$out/gpu_steps.json" 2>&1 | tee "$out/gpu_steps.log"
for run in "chestxray classify.chestxray_study" "fairgen diffusion.fairgen_study" "medmnist classify.medmnist_study"; do
    set -- $run
    t0=$(date +%s)
    timeout 200 $py -m "$2" --smoke --force --out "smoke/$1" > "$out/smoke_$1.log" 2>&1
    rc=$?
    echo "smoke $1 on CUDA: exit $rc, $(( $(date +%s) - t0 )) s; last line: $(tail -n 1 "$out/smoke_$1.log")" \
        | tee -a "$out/smoke.txt"
done
