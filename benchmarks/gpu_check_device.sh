#!/bin/sh
# What one `device` call runs (issue 19 §2): benchmarks/gpu_check.py on the lent GPU machine, its JSON and its log
# in $OUT. That machine's image holds torch (CUDA), transformers, peft, accelerate, typer and the rest, but not
# pydantic: its wheels travel in .whl/ (git-ignored; benchmarks/README.md, "GPU check", says how to fetch them).
# The checkout runs uninstalled: lora_fusion from the root, lora_fusion_cli as a link to cli/.
set -u
cd "$(dirname "$0")/.." || exit 2
if ! ls .whl/pydantic-*.whl >/dev/null 2>&1; then
    echo "no .whl/ here: fetch the pydantic wheels first (benchmarks/README.md, GPU check)" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
ln -sfn cli lora_fusion_cli
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2
python3 benchmarks/gpu_check.py --partial "${OUT:-.}/gpu_check.partial.json" "$@" >"${OUT:-.}/gpu_check.json" \
    2>"${OUT:-.}/gpu_check.log"
status=$?
tail -n 40 "${OUT:-.}/gpu_check.log"
exit $status
