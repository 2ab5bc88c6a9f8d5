"""The per-worker DPO training loop that Ray Train runs on every worker.

It has the shape of Ray Train's examples: `setup` returns one `Worker` state,
and `train_step` and `evaluate` take it. The policy's log-probs come from one
forward pass per micro-batch (both replies of every pair, dpo.forward); the
reference's come from the dataset, scored once offline, so no reference model
is ever loaded here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from dpo import checkpoint as ckpt
from dpo import storage
from dpo.batching import Pairs, choose_layout, collate, epoch_plan, rank_micro_batches
from dpo.config import Config, TrainConfig
from dpo.export import tied_aliases, write_safetensors
from dpo.forward import Layout, PolicyLogps, check_response_head, sequence_logps
from dpo.lora import ADAPTER_DIR, save_merged
from dpo.losses import LossType, preference_loss
from dpo.sharding import clip_grad_norm, gradient_sync, load_policy
from dpo.trackers import Trackers, open_trackers

log = logging.getLogger("raydpo.train")

# Per-step sums all-reduced across ranks, then divided by the pair count.
STATS = ["pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "tokens", "nonfinite"]
AVERAGED = STATS[1:8]
# What a checkpoint holds of the model: the parameters that train, as this rank holds them. All of them, or under
# model.lora the adapters alone (dpo.lora): the frozen base is model.policy's, read again by a restore.
TRAINED_STATE = StateDictOptions(ignore_frozen_params=True)
ATTEMPTS_FILE = "attempts.jsonl"
# PolicyLogps holds the transformers model as `lm`: its keys in checkpoints, not in the exported policy/.
LM_PREFIX = "lm."


@dataclass
class Worker:
    """What one training worker holds between steps."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module      # `policy` as the step runs it, wrapped in DDP or sharded by FSDP; state dicts are its
    policy: PolicyLogps         # its `lm` is the transformers model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_pairs: Pairs
    eval_pairs: Optional[Pairs]
    pad_id: int
    autocast: Any
    steps_per_epoch: int
    total_steps: int
    train_dir: str
    layout: Layout = "padded"   # resolved by choose_layout once the model is restored
    step: int = 0               # the last step done (restored from a checkpoint)
    skipped: int = 0            # batches skipped as non-finite up to `step`
    metrics_log: Optional[ckpt.MetricsLog] = None
    trackers: Optional[Trackers] = None  # train.report_to; a no-op on ranks other than 0
    plan: Optional[tuple[int, np.ndarray]] = None  # (epoch, its global batches)

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train

    @property
    def global_batch(self) -> int:
        return self.t.batch_size * self.world * self.t.grad_accum


@dataclass
class StepResult:
    stats: torch.Tensor   # STATS, summed over all ranks
    grad_norm: float
    learning_rate: float
    seconds: float
    bad_pair_ids: list[str]  # this rank's pairs whose loss was not finite

    @property
    def finite(self) -> bool:
        return self.stats[STATS.index("nonfinite")] == 0 and math.isfinite(self.grad_norm)


def train_loop_per_worker(config: dict) -> Optional[str]:
    """Train; return None, or the error that stopped training (a non-finite loss under
    train.on_nonfinite_loss=error). Ray Train hands rank 0's return value to the driver (Result.return_value),
    which raises it: every rank ends cleanly, since a raised error would make Ray Train retry a deterministic
    failure train.max_failures times."""
    w = setup(config)
    last: dict = {}
    for step in range(w.step + 1, w.total_steps + 1):
        _maybe_fail(w, step)
        result = train_step(w, global_batch(w, step))
        if not result.finite and w.t.on_nonfinite_loss == "error":
            w.trackers.close()
            return _nonfinite_error(w, step, result.bad_pair_ids)
        w.step = step
        do_eval = w.eval_pairs is not None and (step == w.total_steps or (w.t.eval_every and step % w.t.eval_every == 0))
        if step % w.t.log_every == 0 or step == w.total_steps or do_eval:
            last = _step_record(w, result)
            if do_eval:
                last.update(evaluate(w))
            _log(w, last)
        if step % w.t.checkpoint_every == 0 or step == w.total_steps:
            _save(w, last)
    if w.eval_pairs is not None and not last:  # resumed with nothing left to train: still report held-out numbers
        last = evaluate(w)
    w.trackers.close()
    if w.t.save_policy:
        _save_policy(w, storage.join(w.train_dir, "policy"))
    ray.train.report({**last, "done": True})


def setup(config: dict) -> Worker:
    """The policy, its optimizer and the data on this worker, restored from the newest checkpoint if any."""
    cfg = Config.model_validate(config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    ckpt.seed_everything(cfg.run.seed)

    # Every rank sees the whole dataset, mapped from the node's one copy in the object store: see dpo.batching.
    train_pairs = Pairs.from_batch(ray.get(config["train_pairs"]))
    eval_pairs = Pairs.from_batch(ray.get(config["eval_pairs"])) if config["eval_pairs"] is not None else None
    steps_per_epoch = len(train_pairs) // (t.batch_size * world * t.grad_accum)
    total, capped = training_steps(t, steps_per_epoch)
    if capped and rank == 0:
        log.warning(capped)

    policy = load_policy(cfg, device, rank)
    # Again: loading draws from the RNG on some ranks only (under fsdp rank 0 initialises LoRA's A, the others
    # build on the meta device), and dropout's masks must not depend on how the weights were loaded.
    ckpt.seed_everything(cfg.run.seed)
    pad_id = _pad_id(policy.lm)
    # bf16 autocast only where it is fast and asked for; CPU trains in float32.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if t.use_gpu and cfg.model.dtype == "bfloat16"
                else contextlib.nullcontext())
    model = ray.train.torch.prepare_model(policy, parallel_strategy="ddp") if t.strategy == "ddp" else policy
    # Before any forward: FSDP2's lazy initialisation at the first one re-registers the root's parameters.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay)
    w = Worker(cfg=cfg, rank=rank, world=world, device=device, model=model, policy=policy, optimizer=optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total)),
               train_pairs=train_pairs, eval_pairs=eval_pairs, pad_id=pad_id, autocast=autocast,
               steps_per_epoch=steps_per_epoch, total_steps=total,
               train_dir=storage.join(cfg.run.output_dir, "train"))
    _restore(w)
    # After the restore: a forward leaves FSDP2's root unsharded, and a sharded state dict cannot load into that.
    check_response_head(model, policy, device, autocast)
    w.layout = choose_layout(t, model, policy.lm, train_pairs, pad_id, device, autocast)
    w.trackers = open_trackers(cfg, w.train_dir, rank, w.step)
    if rank == 0:
        # The run's own record of where each attempt (a job, or Ray Train's restart of its workers) began.
        ckpt.JsonLines(storage.join(w.train_dir, ATTEMPTS_FILE)).append(
            {"resumed_after_step": w.step, "workers": world, "started": round(time.time(), 3)})
        w.metrics_log = ckpt.MetricsLog(storage.join(w.train_dir, "metrics.jsonl"))
        w.metrics_log.truncate_after(w.step)
        log.info("training %d pairs, %d steps of %d pairs (%d per worker x %d workers x %d accumulation), "
                 "%s layout, logits %s, resuming after step %d", len(train_pairs), total, w.global_batch,
                 t.batch_size, world, t.grad_accum, w.layout,
                 "at response positions only" if policy.response_only else "at every position", w.step)
    model.train()
    return w


def global_batch(w: Worker, step: int) -> np.ndarray:
    """Row indices of step `step`'s global batch: the same on every rank, a function of (seed, epoch, step)."""
    epoch, index = divmod(step - 1, w.steps_per_epoch)
    if w.plan is None or w.plan[0] != epoch:
        w.plan = epoch, epoch_plan(w.train_pairs.tokens, w.global_batch, w.t.length_group_batches,
                                   w.cfg.run.seed, epoch)
    return w.plan[1][index]


def train_step(w: Worker, batch: np.ndarray) -> StepResult:
    """One optimizer step on this rank's share of a global batch; a non-finite step leaves the weights alone."""
    t = w.t
    started = time.perf_counter()
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    bad: list[str] = []
    micro = rank_micro_batches(batch, w.rank, w.world, t.grad_accum)
    for a, rows in enumerate(micro):
        mb = collate(w.train_pairs, rows, w.pad_id, w.layout).to(w.device)
        # Gradients are reduced across ranks on the last micro-step only.
        with gradient_sync(w.model, a == len(micro) - 1), w.autocast:
            chosen, rejected = sequence_logps(w.model, mb.inputs, average=t.average_logps)
            out = micro_batch_losses(t, chosen, rejected, mb)
            (out.losses.sum() / (t.batch_size * t.grad_accum)).backward()
        stats += _batch_stats(out, chosen, rejected, mb)
        bad += [p for p, ok in zip(mb.pair_ids, torch.isfinite(out.losses.detach()).tolist()) if not ok]
    result = StepResult(_all_reduce(stats), clip_grad_norm(w.model, t.max_grad_norm),
                        w.scheduler.get_last_lr()[0], 0.0, bad)
    if result.finite:
        w.optimizer.step()
    elif t.on_nonfinite_loss == "skip":
        w.skipped += 1  # the batch is consumed, the weights stay as they were
    w.optimizer.zero_grad(set_to_none=True)
    w.scheduler.step()
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def evaluate(w: Worker) -> dict:
    """Held-out loss, implicit rewards and reward accuracy, averaged over every eval pair once."""
    t, pairs = w.t, w.eval_pairs
    w.model.eval()
    order = np.argsort(pairs.tokens, kind="stable")
    per_step = t.batch_size * w.world
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    # Every rank runs the same number of forward passes (sharded models gather
    # weights in forward); a rank with nothing left reruns a row and counts nothing.
    for start in range(0, len(order), per_step):
        rows = order[start:start + per_step][w.rank * t.batch_size:(w.rank + 1) * t.batch_size]
        counted = len(rows) > 0
        mb = collate(pairs, rows if counted else order[:1], w.pad_id, w.layout).to(w.device)
        with w.autocast:
            chosen, rejected = sequence_logps(w.model, mb.inputs, average=t.average_logps)
            out = micro_batch_losses(t, chosen, rejected, mb)
        if counted:
            stats += _batch_stats(out, chosen, rejected, mb)
    w.model.train()
    return _averages(_all_reduce(stats), prefix="eval/")


# --------------------------------------------------------------------------- helpers


def training_steps(t: TrainConfig, steps_per_epoch: int) -> tuple[int, Optional[str]]:
    """The run's steps, which are the LR schedule's horizon: train.max_steps, but at most train.epochs epochs;
    and the line that says so when the epochs cap train.max_steps (else None)."""
    by_epochs = t.epochs * steps_per_epoch
    if t.max_steps is None or t.max_steps <= by_epochs:
        return t.max_steps or by_epochs, None
    return by_epochs, (f"train.max_steps={t.max_steps} is capped at {by_epochs} steps by train.epochs={t.epochs} "
                       f"({steps_per_epoch} steps an epoch); raise train.epochs to train longer")


def resumed_schedule(t: TrainConfig, optimizer, scheduler, saved_total: int, total: int, step: int):
    """(scheduler, line) for a run resumed after `step` whose checkpoint's schedule ran over `saved_total` steps.

    The same horizon: the restored scheduler, and None. Another (train.max_steps or train.epochs changed):
    a scheduler on the new curve from step + 1 on, which also sets the optimizer's LR (restored from the old
    curve), and the line that says so: both horizons, and step + 1's LR on each.
    """
    if saved_total == total:
        return scheduler, None
    before, after = (t.learning_rate * lr_schedule(t, n)(step) for n in (saved_total, total))
    # LambdaLR's first step, at construction, moves last_epoch from step - 1 to step: step + 1's LR.
    resumed = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total), last_epoch=step - 1)
    return resumed, (f"resuming after step {step} with an LR schedule over {total} steps instead of {saved_total} "
                     f"(train.max_steps or train.epochs changed): step {step + 1}'s learning rate is {after:.6g}, "
                     f"not {before:.6g}")


def lr_schedule(t: TrainConfig, total: int):
    """LambdaLR factor of step s (0-based): linear warmup, then linear/cosine/constant decay to 0."""
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if t.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 1.0 - progress if t.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor




def _pad_id(model) -> int:
    # Padding is masked out of attention and labels; any valid id will do.
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(model.config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def micro_batch_losses(t: TrainConfig, chosen, rejected, mb):
    needs_reference = any(LossType.parse(name).needs_reference for name in t.loss_types)
    ref_c, ref_r = (mb.ref_chosen, mb.ref_rejected) if needs_reference else (None, None)
    len_c, len_r = mb.chosen_lengths, mb.rejected_lengths
    if t.average_logps:
        # The cached reference scores are sums: put them on the policy's per-token scale, both divided by the
        # reply's scored tokens (dpo.schema.scored_tokens, which collate counted).
        if ref_c is not None:
            ref_c, ref_r = ref_c / len_c.clamp(min=1), ref_r / len_r.clamp(min=1)
        len_c, len_r = torch.ones_like(len_c), torch.ones_like(len_r)
    return preference_loss(chosen, rejected, ref_c, ref_r, loss_type=t.loss_types, beta=t.beta,
                           label_smoothing=t.label_smoothing, chosen_lengths=len_c, rejected_lengths=len_r,
                           **t.loss_options)


def _batch_stats(out, chosen, rejected, mb) -> torch.Tensor:
    rc, rr = out.chosen_rewards.float(), out.rejected_rewards.float()
    losses = out.losses.detach().float()
    values = [mb.num_pairs, losses.sum(), rc.sum(), rr.sum(), (rc > rr).float().sum(), (rc - rr).sum(),
              chosen.detach().float().sum(), rejected.detach().float().sum(), mb.tokens,
              (~torch.isfinite(losses)).sum()]
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        y = x.to(device)
        dist.all_reduce(y)
        return y.cpu()
    return x


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no NaN


def _averages(stats: torch.Tensor, prefix: str = "") -> dict:
    """Per-pair means of the summed STATS: loss, rewards and log-probs."""
    s = dict(zip(STATS, stats.tolist()))
    return {prefix + key: _finite(s[key] / max(s["pairs"], 1.0)) for key in AVERAGED}


def _step_record(w: Worker, result: StepResult) -> dict:
    """The metrics.jsonl line of the step just taken."""
    record = {"step": w.step, "epoch": (w.step - 1) // w.steps_per_epoch, **_averages(result.stats),
              "learning_rate": result.learning_rate, "grad_norm": _finite(result.grad_norm),
              "tokens_per_second": round(float(result.stats[STATS.index("tokens")]) / max(result.seconds, 1e-9), 1)}
    if w.t.on_nonfinite_loss == "skip":
        record["skipped_batches"] = w.skipped
    return record


def _log(w: Worker, record: dict) -> None:
    """metrics.jsonl, the progress line and the trackers (train.report_to), from rank 0."""
    if w.metrics_log:
        w.metrics_log.append(record)
        log.info(_progress(record, w.total_steps))
    w.trackers.log(record, record["step"])


def _progress(m: dict, total: int) -> str:
    def f(key, fmt=".4f"):
        v = m.get(key)
        return "nan" if v is None else format(v, fmt)

    line = (f"step {m['step']}/{total} loss {f('loss')} acc {f('rewards/accuracies', '.3f')} "
            f"margin {f('rewards/margins')} chosen {f('rewards/chosen')} rejected {f('rewards/rejected')} "
            f"lr {m['learning_rate']:.3g} grad_norm {f('grad_norm', '.3f')} {m['tokens_per_second']:.0f} tok/s")
    if "eval/loss" in m:
        line += f" | eval loss {f('eval/loss')} acc {f('eval/rewards/accuracies', '.3f')}"
    return line


def _nonfinite_error(w: Worker, step: int, bad_ids: list[str]) -> str:
    """The one line that stops training at a non-finite step, naming the pairs of every rank (a collective)."""
    gathered = [None] * w.world
    if w.world > 1:
        dist.all_gather_object(gathered, bad_ids)
    else:
        gathered = [bad_ids]
    ids = sorted({p for ids in gathered for p in ids})
    where = f"pairs {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" if ids else "the gradient"
    return (f"non-finite loss at step {step} ({where}); lower train.learning_rate or train.beta, check those "
            "pairs, or set train.on_nonfinite_loss=skip to skip such batches")


def _maybe_fail(w: Worker, step: int) -> None:
    """debug.fail_at_step: one worker dies abruptly, on the first attempt only."""
    if w.cfg.debug.fail_at_step != step or w.rank != min(1, w.world - 1):
        return
    marker = storage.join(w.train_dir, f".failed_at_step_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    log.warning("debug.fail_at_step=%d: rank %d exits now", step, w.rank)
    os._exit(1)


def _train_state(w: Worker) -> dict:
    """What a checkpoint holds of the model and the optimizer, as this rank holds it (under fsdp, its DTensor
    shards), keyed by parameter name (PolicyLogps's, `lm.`-prefixed): the one place that says which tensors
    a checkpoint saves and restores."""
    return {"model": get_model_state_dict(w.model, options=TRAINED_STATE),
            "optimizer": get_optimizer_state_dict(w.model, w.optimizer)}


def _restore(w: Worker) -> None:
    """Load the newest complete checkpoint into the model, optimizer, scheduler and RNG.

    Sets `w.step` and `w.skipped` to its step and the batches skipped as
    non-finite up to it. Each rank reads only the shards it holds.
    """
    folder = ckpt.newest(storage.join(w.train_dir, "checkpoints"))
    if folder is None:
        return
    state = _train_state(w)  # the optimizer's state tensors are made here, zero, to be read into
    ckpt.read_shards(folder, state)
    # Under model.lora the checkpoint holds only the adapters: the base stays as loaded.
    set_model_state_dict(w.model, state["model"], options=StateDictOptions(strict=not w.cfg.model.lora.enabled))
    set_optimizer_state_dict(w.model, w.optimizer, state["optimizer"])
    w.scheduler.load_state_dict(ckpt.load(folder, "scheduler.pt"))
    ckpt.set_rng_state(ckpt.load(folder, "rng.pt")[w.rank])
    saved = ckpt.read_state(folder)
    w.step, w.skipped = int(saved["step"]), int(saved["skipped_batches"])
    # A checkpoint written before state.json held the horizon: taken as unchanged.
    saved_total = int(saved.get("total_steps", w.total_steps))
    w.scheduler, changed = resumed_schedule(w.t, w.optimizer, w.scheduler, saved_total, w.total_steps, w.step)
    if changed and w.rank == 0:
        log.warning(changed)


def _save(w: Worker, metrics: dict) -> None:
    """Every rank writes its shards into the step's folder; rank 0 then the small states, COMPLETE, and the
    report of a pointer to it (dpo.checkpoint)."""
    root = storage.join(w.train_dir, "checkpoints")
    folder = ckpt.begin(root, w.step) if w.rank == 0 else ckpt.folder(root, w.step)
    rng = ckpt.rng_state()
    rngs = [None] * w.world if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)  # also: no rank writes before rank 0 has emptied the folder
    ckpt.write_shards(folder, _train_state(w))
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    ckpt.write_states(folder, scheduler_state=w.scheduler.state_dict(), rng_states=rngs, step=w.step,
                      epoch=(w.step - 1) // w.steps_per_epoch, skipped_batches=w.skipped,
                      total_steps=w.total_steps)
    # dcp.save returns on every rank once the last rank's files and the metadata are written.
    ckpt.finish(root, w.step, w.t.keep_checkpoints)
    with tempfile.TemporaryDirectory(prefix="dpo-ckpt-") as tmp:
        ray.train.report({**metrics, "step": w.step}, checkpoint=ray.train.Checkpoint.from_directory(
            ckpt.pointer(tmp, w.step)), checkpoint_dir_name=f"checkpoint-{w.step:08d}")


def _save_policy(w: Worker, dest: str) -> None:
    """The trained weights and the tokenizer, in Hugging Face format, gathered one tensor at a time."""
    if w.cfg.model.lora.enabled:
        _save_merged_policy(w, dest)
        return
    state = {name.removeprefix(LM_PREFIX): tensor for name, tensor in get_model_state_dict(w.model).items()}
    for alias in tied_aliases(w.policy.lm):
        state.pop(alias, None)
    if w.rank == 0:
        storage.delete_dir(dest)
    write_safetensors(state, dest, rank=w.rank)
    if w.rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="dpo-policy-") as tmp:
        w.policy.lm.config.save_pretrained(tmp)
        if getattr(w.policy.lm, "generation_config", None) is not None:
            w.policy.lm.generation_config.save_pretrained(tmp)
        _save_tokenizer(w.cfg, tmp)
        fs, path = storage.resolve(dest)
        pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _save_merged_policy(w: Worker, dest: str) -> None:
    """Under model.lora: the adapters merged into the base by peft (dpo.lora), and the adapter alone beside
    `dest`. peft merges whole modules, so the model is gathered on rank 0's CPU for this, unlike `_save_policy`."""
    state = get_model_state_dict(w.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if w.rank != 0:
        return
    state = {name.removeprefix(LM_PREFIX): tensor for name, tensor in state.items()}
    with tempfile.TemporaryDirectory(prefix="dpo-policy-") as tmp:
        policy_dir, adapter_dir = os.path.join(tmp, "policy"), os.path.join(tmp, ADAPTER_DIR)
        save_merged(state, w.cfg, w.policy.lm.config, policy_dir, adapter_dir)
        _save_tokenizer(w.cfg, policy_dir)
        _publish(adapter_dir, storage.join(w.train_dir, ADAPTER_DIR))
        _publish(policy_dir, dest)


def _save_tokenizer(cfg: Config, folder: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(cfg.model.tokenizer_path,
                                  trust_remote_code=cfg.model.trust_remote_code).save_pretrained(folder)


def _publish(local_dir: str, dest: str) -> None:
    """Replace the folder `dest` (a path or URI) by a copy of `local_dir`."""
    storage.delete_dir(dest)
    fs, path = storage.resolve(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
