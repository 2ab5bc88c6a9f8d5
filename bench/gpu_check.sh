#!/usr/bin/env bash
# The GPU checks (bench/gpu_check.py) on a lent GPU machine, from a fresh one.
#
# Here, once:  echo '/.vllm*/' >> .git/info/exclude   (already in .gitignore)
#              ../shared/gpu/fetch-vllm-wheels.sh .vllm          # .vllm-1 ... .vllm-N
#              mkdir -p .hh && cp ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz .hh/
# Device calls, back to back while the machine stays warm (it goes back 30 s after a call); about 23
# minutes of the 30 a session has, by estimate, so a failed call leaves little room:
#   run(command="true", carry=[".vllm-1", ".hh"]); run(command="true", carry=[".vllm-2"]) ... up to .vllm-(N-1)
#   run(command="bash .vllm-1/install-vllm.sh /tmp/site && touch /tmp/site/.installed", carry=[".vllm-N"])
#   run(command="bash bench/gpu_check.sh --phases model,score --out $OUT")                  # ~8 min
#   run(command="bash bench/gpu_check.sh --phases jobs --dtypes bfloat16 --out $OUT")       # ~7 min (30 fsdp, 30 flex steps; estimate)
#   run(command="bash bench/gpu_check.sh --phases jobs --dtypes float32 --out $OUT")        # ~3 min
# The report grows in /tmp/gpu_check across calls; each call's $OUT gets all of it so far.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .vllm-1 ] && [ ! -e /tmp/site/.installed ]; then
  bash .vllm-1/install-vllm.sh /tmp/site && touch /tmp/site/.installed
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site:$PYTHONPATH"; fi
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "$@"
