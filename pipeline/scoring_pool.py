"""The driver's side of scoring: what is refused before any actor starts, and the actor pool's arguments."""

from __future__ import annotations

import contextlib
import json
import struct
import uuid
from typing import Iterator, Optional

from dpo import storage
from dpo.config import Config
from dpo.errors import UserError
from dpo.job_cpus import refuse_unless_fits
from dpo.model_folders import check_max_length, read_model_config, weight_names
from pipeline.placement import release_placement_groups
from pipeline.scoring import FAIL_MARKER, tensor_parallel
from pipeline.vllm_scorer import check_cpu_kv_cache, require_vllm


def check_reference_model(cfg: Config) -> None:
    """Fail on the driver, before any actor starts, when the reference model cannot load.

    Reads the config and the safetensors headers only, where the model is (a
    folder or a bucket): loading or copying the weights here would cost the
    driver's node a model's worth of memory or disk.
    """
    key = cfg.model.reference_key
    path = cfg.model.reference_path
    hf_config = read_model_config(path, key, cfg.model.trust_remote_code)
    weights = [n for n in weight_names(path, key) if n.endswith(".safetensors")]
    if not weights:
        raise UserError(f"{key}: {path} holds no *.safetensors weights; convert the checkpoint with "
                        "save_pretrained(..., safe_serialization=True)")
    for name in weights:
        _check_safetensors_header(storage.join(path.rstrip("/"), name), key)
    ref = cfg.reference
    vllm = ref.backend == "vllm"
    check_max_length(hf_config, max_length=cfg.data.max_length, key=key, path=path, extra=1 if vllm else 0,
                     why=" (vLLM keeps a position for the one token it generates after the scored sequence)"
                     if vllm else "")
    check_pool_fits(cfg)
    if not vllm:
        return
    if require_vllm(ref).cpu:
        check_cpu_kv_cache(cfg, hf_config, key)
        return
    if tensor_parallel(ref):  # a tensor-parallel actor's GPUs are its placement group
        return
    if ref.gpu_memory_utilization > ref.gpus_per_actor:
        # vLLM takes this fraction of the whole GPU: actors sharing one would each ask for it.
        raise UserError(f"reference.gpus_per_actor={ref.gpus_per_actor:g} puts several vLLM actors on one GPU, but "
                        f"each takes reference.gpu_memory_utilization={ref.gpu_memory_utilization:g} of its memory; "
                        f"set reference.gpu_memory_utilization to at most {ref.gpus_per_actor:g} (a little less "
                        "leaves room for CUDA's own use)")


# Ray Data gives each read and tokenize task one CPU (its default for map tasks).
TASK_CPUS = 1.0


def _check_safetensors_header(path: str, key: str) -> None:
    """The header of a safetensors file: 8 bytes of its length, then a JSON object whose tensors' data offsets
    lie within the file. Read with two ranged reads, from local disk or an object store alike."""
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as fh:
            size = fh.size()
            length = struct.unpack("<Q", fh.read_at(8, 0))[0] if size >= 8 else -1
            if not 0 < length <= size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(fh.read_at(length, 8))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for name, tensor in header.items():
            if name != "__metadata__" and not tensor["data_offsets"][1] <= size - 8 - length:
                raise ValueError(f"tensor {name} ends past the file's end")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise UserError(f"{key}: {path} is not a readable safetensors file ({exc}); re-save or re-download "
                        "the model") from None


def check_pool_fits(cfg: Config) -> None:
    """Refuse a pool that leaves no CPU for the read and tokenize tasks feeding it: they would never run.

    Counts the CPUs this job can use (dpo.job_cpus), not the cluster's total: under
    `ray job submit --entrypoint-num-cpus 1` on 2 CPUs the driver holds one and a
    1-CPU actor the other.
    """
    ref = cfg.reference
    refuse_unless_fits(ref.num_actors * ref.cpus_per_actor + TASK_CPUS,
                       f"the scoring pool (reference.num_actors={ref.num_actors} x reference.cpus_per_actor="
                       f"{ref.cpus_per_actor:g}) and its read/tokenize tasks ({TASK_CPUS:g} CPU each)",
                       lower="reference.num_actors or reference.cpus_per_actor (fractions such as 0.5 are fine)",
                       fixed=TASK_CPUS)


@contextlib.contextmanager
def actor_pool(cfg: Config, folder: str) -> Iterator[dict]:
    """Keyword arguments of `map_pool(ds, ReferenceScorer, ...)` for the length of one scoring stage.

    Tensor-parallel actors make placement groups that outlive them (see
    pipeline.placement): a job that scores twice (train, then eval, then
    trains: jobs.pipeline) would wait forever for the GPUs the first pool's
    groups still hold, so they are removed when the stage ends, however it ends.
    """
    import ray

    ref = cfg.reference
    grouped = tensor_parallel(ref)
    prefix = f"raydpo-scoring-{uuid.uuid4().hex[:12]}"
    marker = fail_marker(cfg, folder)
    try:
        yield dict(
            fn_constructor_kwargs={"cfg": cfg, "fail_marker": marker, "group_prefix": prefix,
                                   "engine": str(require_vllm(ref)) if ref.backend == "vllm" else None},
            # One call in flight per actor, so the next goes to an idle one: by default an actor takes up to 4,
            # and on two nodes one actor scored all 1,000 pairs of a file (on one node 200 pairs went 200/0,
            # now 100/100). The actor scores its calls one at a time anyway.
            compute=ray.data.ActorPoolStrategy(size=ref.num_actors, max_tasks_in_flight_per_actor=1),
            # A tensor-parallel actor only forwards batches: its CPUs and GPUs are its engine's group.
            num_cpus=0 if grouped else ref.cpus_per_actor,
            num_gpus=0 if grouped else ref.gpus_per_actor,
            batch_format="pyarrow",
            batch_size=ref.pairs_per_call,
            # Ray Data restarts a dead pool actor forever by default, so a deterministic
            # crash (an OOM on one batch) would loop. A bound makes the job fail with the
            # actor's cause: a task in flight is retried on the restarted actor, and fails
            # once the actor is dead for good.
            max_restarts=ref.max_restarts,
            max_task_retries=-1 if ref.max_restarts > 0 else 0,
        )
    finally:
        if grouped:
            release_placement_groups(prefix)


def fail_marker(cfg: Config, folder: str) -> Optional[str]:
    """Where debug.fail_scoring_after_batches records that an actor died: a local file, created exclusively.

    Object stores (and fsspec, pyarrow) offer no exclusive create, so on a URI several actors could each see
    no marker and die: refused in one line.
    """
    if cfg.debug.fail_scoring_after_batches is None:
        return None
    if storage.is_uri(folder):
        raise UserError(f"debug.fail_scoring_after_batches needs a local run.output_dir, not {cfg.run.output_dir}: "
                        "its marker, which lets exactly one scoring actor die, is created exclusively, and object "
                        "stores cannot do that")
    return storage.join(folder, FAIL_MARKER)


def map_pool(ds, cls, pool: dict):
    """`ds.map_batches(cls, **pool)`, `pool` from actor_pool, without a deprecation warning from Ray.

    Ray 2.60's map_batches has no named parameter for the actors' max_restarts and
    max_task_retries; it takes them only through **ray_remote_args or
    ray_remote_args_fn, both deprecated. map_batches_internal, the developer API
    that map_batches calls after its own checks (a batch_size of at least 1, which
    actor_pool always sets), takes them as they are; Ray's own batch-inference
    stages call it for the same reason.

    Ray Data hands a block to one actor whole, and the read makes a file one block (its shards coalesced):
    the rows are first cut into blocks of one call each, so every actor gets some.
    """
    return ds.repartition(target_num_rows_per_block=pool["batch_size"]).map_batches_internal(cls, **pool)
