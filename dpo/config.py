"""Typed configuration: one YAML file serves every stage, dotted overrides on top.

`load_config(path, overrides)` is the only way in. Every mistake a user can make
here (unknown key, wrong type, bad value, missing file) raises `ConfigError`
with one line that names the key and what to do about it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError, PydanticKnownError

from dpo.errors import UserError
from dpo.loss_options import BETA, LABEL_SMOOTHING, LOSS_OPTION_NAMES, LossArgumentError, LossOptions

_LOSS_OPTION_TYPES = typing.get_type_hints(LossOptions)


class ConfigError(UserError):
    pass


# Marks a key (or a whole section) that may change between a run and its resumption (dpo.launch): it does not
# alter what a step computes. The logits path changes only float rounding (dpo.forward); gradient
# checkpointing recomputes the same values, dropout's RNG state included; the scoring actors' settings change how
# the reference scores are computed, not what they are, and a re-scored dataset is compared by its fingerprint.
# The world size and the accumulation split a step's global batch, whose micro-batches, dropout seeds and weights
# do not depend on the split (dpo.batching.rank_micro_batches): they alter the step only through the global
# batch's size, which dpo.launch compares on its own (TrainConfig.global_batch).
RESUMABLE = {"resume_safe": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("dpo", json_schema_extra=RESUMABLE)
    output_dir: str = Field("runs/dpo", json_schema_extra=RESUMABLE)  # a run folder may be moved
    seed: int = 0
    # A read/tokenize/score stage that writes nothing for this long while tasks or actors wait
    # for resources the cluster does not free fails, naming them (null: wait forever).
    stall_timeout_s: Optional[float] = Field(600.0, gt=0, json_schema_extra=RESUMABLE)


class DataConfig(_Section):
    train_files: list[str] = Field(default_factory=list)
    eval_files: list[str] = Field(default_factory=list)
    format: Literal["auto", "explicit", "conversational", "implicit"] = "auto"
    max_length: int = Field(512, gt=1)
    max_prompt_length: int = Field(256, gt=0)
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    # Input rows per deterministic shard: the unit of resume and of output files.
    shard_rows: int = Field(1000, gt=0, json_schema_extra=RESUMABLE)
    # An input file that cannot be read at all: fail the job naming it, or record
    # it in rejects.jsonl and go on with the other files.
    on_unreadable_file: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}) so every prompt leaves room for a reply"
            )
        return self


class LoraConfig(_Section):
    """LoRA adapters (peft) on the frozen policy: only they train and only they are checkpointed (dpo.lora)."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the adapter's update is scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    # Module names (the last part of the path, as peft matches them): every linear layer of a Llama, Qwen2 or
    # Mistral decoder layer, attention and MLP.
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], min_length=1)


class ModelConfig(_Section):
    policy: str = ""
    reference: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Custom modelling code runs arbitrary Python from the model folder: opt in only.
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    # Scored positions whose full-vocabulary logits exist at once, in training and in hf scoring
    # (dpo.forward): the peak of the output head is this x vocabulary x 4 bytes, however long the batch.
    logits_chunk_size: int = Field(1024, gt=0, json_schema_extra=RESUMABLE)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def reference_path(self) -> str:
        return self.reference or self.policy

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.policy

    @property
    def reference_key(self) -> str:
        """The key a message about the reference folder names: the one the user set."""
        return "model.reference" if self.reference else "model.policy"

    @property
    def tokenizer_key(self) -> str:
        """The key a message about the tokenizer folder names: the one the user set."""
        return "model.tokenizer" if self.tokenizer else "model.policy"


class ReferenceConfig(_Section):
    backend: Literal["vllm", "hf"] = "hf"
    num_actors: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    gpus_per_actor: float = Field(0, ge=0, json_schema_extra=RESUMABLE)
    cpus_per_actor: float = Field(1, gt=0, json_schema_extra=RESUMABLE)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    batch_tokens: int = Field(16384, gt=0, json_schema_extra=RESUMABLE)
    # Pairs handed to one actor call; the actor re-batches them by length under batch_tokens.
    pairs_per_call: int = Field(256, gt=0, json_schema_extra=RESUMABLE)
    # Times a crashed scoring actor is restarted before the job fails with its cause.
    max_restarts: int = Field(2, ge=0, json_schema_extra=RESUMABLE)
    # Fraction of GPU memory vLLM may take.
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, json_schema_extra=RESUMABLE)
    # KV cache of each vLLM actor running vLLM's CPU build, GiB. Without it the CPU
    # engine takes gpu_memory_utilization of the node's RAM, and fails where other
    # processes (Ray, the other actors) already hold some.
    cpu_kv_cache_gib: float = Field(1.0, gt=0, json_schema_extra=RESUMABLE)
    # torch.compile of the vLLM engine's model. null: off on vLLM's CPU build, on elsewhere (vLLM's own default).
    # On the CPU build compiling added 37 s to an engine start and scored 1.22x faster (docs/benchmarks.md),
    # while the hf backend scored 2.3x faster than either: the CPU build is for trying the vLLM path, where the
    # start is what counts. It changes rounding (9e-6 nats a sequence there), not the scores' value.
    vllm_compile: Optional[bool] = Field(None, json_schema_extra=RESUMABLE)
    # vLLM's own log level in the scoring actors: its INFO lines run to hundreds per actor.
    vllm_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", json_schema_extra=RESUMABLE)


LossName = str

# Every dpo.loss_options.LossOptions field, as a train.<name> key of its type and default.
_LossKeys = create_model("_LossKeys", __base__=_Section,
                         **{f.name: (_LOSS_OPTION_TYPES[f.name], f.default) for f in dataclasses.fields(LossOptions)})


class TrainConfig(_LossKeys):
    # A number of workers, or [min, max]: an elastic group (Ray Train's), which starts with what the cluster
    # holds, restarts smaller from the last checkpoint when a node is lost and larger when room returns.
    num_workers: Union[int, list[int]] = Field(2, json_schema_extra=RESUMABLE)
    # How often an elastic group smaller than its max looks for room to grow (Ray Train's
    # elastic_resize_monitor_interval_s); each grow is a restart from the last checkpoint.
    elastic_resize_interval_s: float = Field(60.0, gt=0, json_schema_extra=RESUMABLE)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, json_schema_extra=RESUMABLE)
    gpus_per_worker: float = Field(1, ge=0)
    # How Ray places the workers' bundles on nodes: PACK fills a node first; SPREAD (STRICT_SPREAD: one per
    # node, or wait) puts them on different nodes, for a node's bandwidth or memory each.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", json_schema_extra=RESUMABLE)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Checked, with loss_weights and the other loss keys, by dpo.losses.check_loss_config.
    loss_type: Union[LossName, list[LossName]] = "sigmoid"
    beta: float = BETA  # checked, as the loss keys are, by dpo.losses.check_loss_config
    label_smoothing: float = LABEL_SMOOTHING
    average_logps: bool = False
    learning_rate: float = Field(5.0e-7, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    # Pairs of one forward pass on a worker: a step's global batch is cut into micro-batches of this many (the
    # last one smaller where it does not divide), dealt to the workers in turn.
    batch_size: int = Field(8, ge=1)
    # Micro-batches per worker a step, without train.global_batch_size: the global batch is then
    # batch_size x num_workers x grad_accum pairs.
    grad_accum: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    # Pairs per optimizer step, whatever the number of workers: each worker's number of micro-batches follows
    # from it. null: batch_size x num_workers x grad_accum.
    global_batch_size: Optional[int] = Field(None, ge=1, json_schema_extra=RESUMABLE)
    max_steps: Optional[int] = Field(None, ge=1, json_schema_extra=RESUMABLE)
    checkpoint_every: int = Field(100, ge=1, json_schema_extra=RESUMABLE)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=RESUMABLE)
    max_failures: int = Field(2, ge=0, json_schema_extra=RESUMABLE)
    log_every: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    eval_every: Optional[int] = Field(None, ge=1, json_schema_extra=RESUMABLE)
    # How a micro-batch runs through the forward (dpo.forward): padded, 2b rows; packed, the 2b sequences end to
    # end in one row, less work only under flash attention, which takes packed position_ids without a dense
    # T x T mask; shared_prompt, one row per pair, prompt + chosen + rejected, the prompt computed once, under an
    # attention that takes its mask (eager, sdpa; on GPU flex_attention, without a dense T x T tensor). auto takes
    # each where it pays (dpo.runtime.choose_layout): packed under flash attention if the model honours packed
    # position ids, shared_prompt on CPU under eager or sdpa, where it was measured faster (docs/benchmarks.md),
    # else padded. Not RESUMABLE: packed is taken as asked, unchecked, and a model that ignores packed position
    # ids attends across sequences, so a step computes something else in packed than in the other layouts.
    layout: Literal["auto", "padded", "packed", "shared_prompt"] = "auto"
    # auto: the output head runs only at the positions that predict a response token, where the model
    # allows it (dpo.forward checks); off: at every position, as a plain forward does.
    response_logits: Literal["auto", "off"] = Field("auto", json_schema_extra=RESUMABLE)
    # Keep only each decoder layer's input in the forward and recompute the layer in the backward (the model's own
    # gradient_checkpointing_enable, non-reentrant): activation memory of one layer instead of all, for ~1 more forward.
    gradient_checkpointing: bool = Field(False, json_schema_extra=RESUMABLE)
    # Pairs per length-sorted pool from which batches are cut (in global batches).
    length_group_batches: int = Field(8, ge=1)
    on_nonfinite_loss: Literal["error", "skip"] = "error"
    # Experiment trackers that rank 0 logs every metrics record to (dpo/trackers.py: where each one writes).
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list,
                                                                       json_schema_extra=RESUMABLE)
    # The W&B project and the MLflow experiment; unset: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else raydpo.
    tracker_project: Optional[str] = Field(None, json_schema_extra=RESUMABLE)
    save_policy: bool = Field(True, json_schema_extra=RESUMABLE)

    @field_validator("num_workers", mode="plain")
    @classmethod
    def _workers(cls, value):
        # By hand: pydantic's union would report a mistake once for each form, under keys of its own.
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(type(v) is int for v in value) or not 1 <= value[0] <= value[1]:
                raise ValueError(f"train.num_workers={list(value)} is not an elastic range [min, max] of whole "
                                 "numbers with 1 <= min <= max; write e.g. [1, 4], or one number for a fixed group")
            return list(value)
        if type(value) is not int:
            raise PydanticCustomError("int_type", "Input should be a valid integer, or a list [min, max] of them")
        if value < 1:
            raise PydanticKnownError("greater_than_equal", {"ge": 1})
        return value

    @model_validator(mode="after")
    def _elastic(self) -> "TrainConfig":
        if not self.elastic:
            return self
        if self.max_failures == 0:
            raise ValueError(f"train.max_failures=0 ends an elastic run (train.num_workers={self.num_workers}) "
                             "at its first lost node: Ray Train counts the restart of the smaller group as a failure; "
                             "set train.max_failures above 0, or a fixed train.num_workers")
        if self.placement_strategy.startswith("STRICT_"):
            raise ValueError(f"train.placement_strategy={self.placement_strategy} with train.num_workers="
                             f"{self.num_workers}: Ray Train sizes an elastic group by what all its nodes hold "
                             "together, so a group may come that a strict placement can never place; use PACK or "
                             "SPREAD (a train.cpus_per_worker or gpus_per_worker of a whole node's puts one worker "
                             "on each)")
        return self

    @model_validator(mode="after")
    def _losses(self) -> "TrainConfig":
        from dpo.losses import check_loss_config

        try:
            check_loss_config(self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                              **self.loss_options)
        except LossArgumentError as exc:  # its message starts with the argument at fault, a train.* key
            raise ValueError(f"train.{exc}") from None
        return self

    @field_validator("response_logits", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 reads a bare on/off as a boolean: `train.response_logits=off` means the string.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} and train.warmup_ratio={self.warmup_ratio:g} "
                             "both set the warmup; set one of them, the other to 0")
        return self

    @model_validator(mode="after")
    def _global_batch(self) -> "TrainConfig":
        if self.global_batch_size is None:
            return self
        if self.grad_accum != 1:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} and train.grad_accum="
                             f"{self.grad_accum} both set the micro-batches of a step (with train.global_batch_size "
                             "they follow from it and the number of workers); set one of them, train.grad_accum "
                             "to 1")
        # dpo.batching.rank_micro_batches deals micro-batch m to rank m % world: at any world size up to the
        # largest, every rank is dealt one of its own (besides stand-ins) exactly when there are that many.
        micro_batches = -(-self.global_batch_size // self.batch_size)
        if micro_batches < self.max_workers:
            most = (f"the {self.max_workers} workers of train.num_workers={self.num_workers} at its largest"
                    if self.elastic else f"train.num_workers={self.num_workers}")
            raise ValueError(f"train.global_batch_size={self.global_batch_size} makes {micro_batches} micro-batch"
                             f"{'es' if micro_batches > 1 else ''} of up to train.batch_size={self.batch_size} pairs "
                             f"a step, fewer than {most}, so a worker would train on "
                             "nothing; raise train.global_batch_size, or lower train.batch_size or "
                             "train.num_workers")
        return self

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def global_batch(self) -> int:  # of the keys GLOBAL_BATCH_KEYS
        """Pairs per optimizer step: the one place that says how many. An elastic group's default is its largest
        group's step, which every smaller group takes in more micro-batches a worker."""
        return self.global_batch_size or self.batch_size * self.max_workers * self.grad_accum

    @property
    def loss_options(self) -> dict:
        """The ``**options`` of dpo.losses.preference_loss, from their train.* keys."""
        return {name: getattr(self, name) for name in LOSS_OPTION_NAMES}

    @property
    def loss_types(self) -> list[str]:
        return list(self.loss_type) if isinstance(self.loss_type, list) else [self.loss_type]


# The train.* keys that TrainConfig.global_batch is made of.
GLOBAL_BATCH_KEYS = ("global_batch_size", "batch_size", "num_workers", "grad_accum")


class DebugConfig(_Section):
    """Fault injection for recovery tests; never set in real runs."""

    fail_at_step: Optional[int] = Field(None, ge=1)
    fail_scoring_after_batches: Optional[int] = Field(None, ge=0)
    # How many times in all the pool's actors die there: more than reference.max_restarts fails the stage.
    scoring_deaths: int = Field(1, ge=1)
    # An actor holding this many CPUs starts right after the precompute's resource check, as
    # another job taking them would: the stall the check cannot foresee.
    hold_cpus_after_check: Optional[float] = Field(None, gt=0)
    # An elastic group smaller than its max waits before this step until Ray Train grows it back (its resize
    # ends the waiting group), so that a test returning a lost node finds the run still going.
    wait_for_full_group_at_step: Optional[int] = Field(None, ge=1)


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig, json_schema_extra=RESUMABLE)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str) -> None:
        from dpo.storage import write_text

        write_text(path, self.to_yaml())


# --------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; write it as e.g. train.num_workers=4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; write it as e.g. train.num_workers=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = copy.deepcopy(tree)
    for item in overrides:
        parts, value = _parse_override(item)
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return tree


# The train.layout each setting of the two switches it replaced amounts to, as layout_of_retired_switches computes it.
_SWITCHES_AS_LAYOUT = ("packing=on is layout=packed; prefix_sharing=on is shared_prompt; both off is padded; both "
                       "auto is auto; packing=auto with prefix_sharing=off is auto under flash attention, else padded; "
                       "packing=off with prefix_sharing=auto is padded under flash attention, else auto")

# Keys that were replaced: an old config that sets one is told what to write instead.
RETIRED_KEYS = {"train.tensorboard": "train.tensorboard is gone: list the trackers in train.report_to instead, "
                                     "e.g. train.report_to: [tensorboard]",
                "train.alpha": "train.alpha is now train.divergence_alpha (the α of loss_type alpha_divergence)",
                "train.packing": "train.packing is now train.layout, which replaced it and train.prefix_sharing "
                                 f"(either unset is auto): {_SWITCHES_AS_LAYOUT}",
                "train.prefix_sharing": "train.prefix_sharing is now train.layout, which replaced it and "
                                        f"train.packing (either unset is auto): {_SWITCHES_AS_LAYOUT}"}


def layout_of_retired_switches(packing: str, prefix_sharing: str, attn_implementation: Optional[str]) -> str:
    """The train.layout that lays a batch out as train.packing and train.prefix_sharing did: what a run saved
    before train.layout replaced them ran with (dpo.launch compares it on resume).

    Their auto packed only under flash attention and shared the prompt only under another, so the auto of
    one switch with the other off is auto under the one attention and padded under the other. Both on was
    refused, and prefix_sharing=on under flash attention too (dpo.launch).
    """
    if packing == "on":
        return "packed"
    if prefix_sharing == "on":
        return "shared_prompt"
    if packing == prefix_sharing:
        return "auto" if packing == "auto" else "padded"
    flash = (attn_implementation or "").startswith("flash")
    return "auto" if flash == (packing == "auto") else "padded"


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and key in RETIRED_KEYS:
        return RETIRED_KEYS[key]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        known = _known_keys(err["loc"][:-1])
        hint = f"; known keys{' in ' + section if section else ''}: {', '.join(known)}" if known else ""
        return f"unknown config key '{key}'{hint}"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return msg if not key or msg.startswith(key) else f"{key}: {msg}"
    got = err.get("input")
    return f"config key '{key}': {err['msg'].lower()} (got {got!r})"


def _known_keys(loc) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    tree: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file")
        with open(path, encoding="utf-8") as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (run:, data:, ...)")
    tree = apply_overrides(tree, overrides or [])
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(_describe(first) + suffix) from None


def resume_safe(dotted_key: str) -> bool:
    """Whether the config key `dotted_key` ("train.max_steps") is marked RESUMABLE, itself or its section."""
    model: Any = Config
    for part in dotted_key.split("."):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        if (field.json_schema_extra or {}).get("resume_safe"):
            return True
        model = field.annotation
    return False
