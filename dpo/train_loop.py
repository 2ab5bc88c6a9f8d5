"""The per-worker DPO training loop that Ray Train runs on every worker.

It has the shape of Ray Train's examples: `setup` returns one `Worker` state,
and `train_step` and `evaluate` take it. The policy's log-probs come from one
forward pass per micro-batch (both replies of every pair, dpo.forward); the
reference's come from the dataset, scored once offline, so no reference model
is ever loaded here. A `Worker` is what a checkpoint saves (dpo.checkpoint's
`TrainState`), what the run is fixed to (`Context`, its forward's dpo.runtime
`Runtime` among it), where results go (`Sinks`), and one cache (the epoch's
plan).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dpo import checkpoint as ckpt
from dpo import storage
from dpo.batching import Pairs, collate, epoch_plan, micro_batch_seed, packing_supported, rank_micro_batches
from dpo.config import Config, TrainConfig
from dpo.export import save_policy
from dpo.forward import sequence_logps
from dpo.losses import needs_reference, preference_loss
from dpo.runtime import Runtime, training_autocast
from dpo.schedule import lr_schedule, resumed_schedule, training_steps
from dpo.sharding import clip_grad_norm, gradient_sync, load_policy
from dpo.trackers import Trackers, open_trackers

log = logging.getLogger("raydpo.train")

# Per-step sums all-reduced across ranks, then divided by the pair count.
STATS = ["pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "tokens", "nonfinite"]
AVERAGED = STATS[1:8]
ATTEMPTS_FILE = "attempts.jsonl"


@dataclass
class Context:
    """What one worker's run is fixed to: set up once, never checkpointed."""

    cfg: Config
    rank: int
    world: int
    runtime: Runtime
    train_pairs: Pairs
    eval_pairs: Optional[Pairs]
    steps_per_epoch: int
    total_steps: int
    train_dir: str

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train


@dataclass
class Sinks:
    """Where results go: metrics.jsonl (rank 0 only) and the trackers (train.report_to; no-ops off rank 0)."""

    metrics_log: Optional[ckpt.MetricsLog]
    trackers: Trackers


@dataclass
class Worker:
    """What one training worker holds between steps."""

    ctx: Context
    state: ckpt.TrainState
    sinks: Sinks
    plan: Optional[tuple[int, np.ndarray]] = None  # a cache: (epoch, its global batches)


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
    c, t = w.ctx, w.ctx.t
    last: dict = {}
    for step in range(w.state.step + 1, c.total_steps + 1):
        _maybe_fail(w, step)
        _maybe_wait_for_full_group(w, step)
        result = train_step(w, batch_rows(w, step))
        if not result.finite and t.on_nonfinite_loss == "error":
            w.sinks.trackers.close()
            return _nonfinite_error(w, step, result.bad_pair_ids)
        w.state.step = step
        do_eval = c.eval_pairs is not None and (step == c.total_steps or (t.eval_every and step % t.eval_every == 0))
        # Step 1 always: policy == reference there, so its loss is the run's first check (ln 2 for sigmoid).
        if step == 1 or step % t.log_every == 0 or step == c.total_steps or do_eval:
            last = _step_record(w, result)
            if do_eval:
                last.update(evaluate(w))
            _log(w, last)
        if step % t.checkpoint_every == 0 or step == c.total_steps:
            ckpt.save(w.state, c.train_dir, rank=c.rank, epoch=(step - 1) // c.steps_per_epoch,
                      total_steps=c.total_steps, keep=t.keep_checkpoints, metrics=last)
    if c.eval_pairs is not None and not last:  # resumed with nothing left to train: still report held-out numbers
        last = evaluate(w)
    w.sinks.trackers.close()
    if t.save_policy:
        save_policy(w.state.model, c.runtime.policy.lm, c.cfg, storage.join(c.train_dir, "policy"), rank=c.rank,
                    train_dir=c.train_dir)
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
    steps_per_epoch = len(train_pairs) // t.global_batch
    total, capped = training_steps(t, steps_per_epoch)
    if capped and rank == 0:
        log.warning(capped)

    policy = load_policy(cfg, device, rank)
    # Again: loading draws from the RNG on some ranks only (under fsdp rank 0 initialises LoRA's A, the others
    # build on the meta device), and dropout's masks must not depend on how the weights were loaded.
    ckpt.seed_everything(cfg.run.seed)
    model = ray.train.torch.prepare_model(policy, parallel_strategy="ddp") if t.strategy == "ddp" else policy
    runtime = Runtime(device=device, policy=policy, model=model, autocast=training_autocast(t.use_gpu, cfg.model.dtype))
    # Before any forward: FSDP2's lazy initialisation at the first one re-registers the root's parameters.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay)
    state = ckpt.TrainState(model=model, optimizer=optimizer,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total)))
    c = Context(cfg=cfg, rank=rank, world=world, runtime=runtime, train_pairs=train_pairs, eval_pairs=eval_pairs,
                steps_per_epoch=steps_per_epoch, total_steps=total, train_dir=storage.join(cfg.run.output_dir, "train"))
    saved = ckpt.restore(state, c.train_dir, lora=cfg.model.lora.enabled)
    if saved is not None:
        # A checkpoint written before state.json held the horizon: taken as unchanged.
        state.scheduler, changed = resumed_schedule(t, optimizer, state.scheduler,
                                                    int(saved.get("total_steps", total)), total, state.step)
        if changed and rank == 0:
            log.warning(changed)
    runtime.settle(t.layout, packs=lambda: packing_supported(
        model, train_pairs, runtime.pad_id, device, runtime.autocast))
    trackers = open_trackers(cfg, c.train_dir, rank, state.step)
    metrics_log = None
    if rank == 0:
        # The run's own record of where each attempt (a job, or Ray Train's restart of its workers) began.
        ckpt.JsonLines(storage.join(c.train_dir, ATTEMPTS_FILE)).append(
            {"resumed_after_step": state.step, "workers": world, "started": round(time.time(), 3)})
        metrics_log = ckpt.MetricsLog(storage.join(c.train_dir, "metrics.jsonl"))
        metrics_log.truncate_after(state.step)
        log.info("training %d pairs, %d steps of %d pairs (%d micro-batch passes of up to %d pairs per worker x "
                 "%d workers), %s layout, logits %s, resuming after step %d", len(train_pairs), total,
                 t.global_batch, len(rank_micro_batches(np.arange(t.global_batch), t.batch_size, rank, world)),
                 t.batch_size, world, runtime.layout,
                 "at response positions only" if policy.response_only else "at every position", state.step)
    model.train()
    return Worker(ctx=c, state=state, sinks=Sinks(metrics_log, trackers))


def batch_rows(w: Worker, step: int) -> np.ndarray:
    """Row indices of step `step`'s global batch: the same on every rank, a function of (seed, epoch, step)."""
    c = w.ctx
    epoch, index = divmod(step - 1, c.steps_per_epoch)
    if w.plan is None or w.plan[0] != epoch:
        w.plan = epoch, epoch_plan(c.train_pairs.tokens_per_pair, c.t.global_batch, c.t.length_group_batches,
                                   c.cfg.run.seed, epoch)
    return w.plan[1][index]


def train_step(w: Worker, batch: np.ndarray) -> StepResult:
    """Optimizer step state.step + 1 on this rank's share of its global batch; a non-finite step leaves the
    weights alone."""
    c, s, rt = w.ctx, w.state, w.ctx.runtime
    t = c.t
    started = time.perf_counter()
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    bad: list[str] = []
    shares = rank_micro_batches(batch, t.batch_size, c.rank, c.world)
    for a, share in enumerate(shares):
        mb = collate(c.train_pairs, share.rows, rt.pad_id, rt.layout).to(rt.device)
        # Dropout draws what this global micro-batch draws on any rank, at any world size.
        torch.manual_seed(micro_batch_seed(c.cfg.run.seed, s.step + 1, share.index))
        # Gradients are reduced across ranks on the last micro-step only.
        with gradient_sync(rt.model, a == len(shares) - 1), rt.autocast:
            chosen, rejected = sequence_logps(rt.model, mb.inputs, average=t.average_logps)
            out = micro_batch_losses(t, chosen, rejected, mb)
            (out.losses.sum() * share.loss_weight).backward()
        if not share.counted:
            continue
        stats += _batch_stats(out, chosen, rejected, mb)
        bad += [p for p, ok in zip(mb.pair_ids, torch.isfinite(out.losses.detach()).tolist()) if not ok]
    result = StepResult(_all_reduce(stats), clip_grad_norm(rt.model, t.max_grad_norm),
                        s.scheduler.get_last_lr()[0], 0.0, bad)
    if result.finite:
        s.optimizer.step()
    elif t.on_nonfinite_loss == "skip":
        s.skipped += 1  # the batch is consumed, the weights stay as they were
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def evaluate(w: Worker) -> dict:
    """Held-out loss, implicit rewards and reward accuracy, averaged over every eval pair once."""
    c, rt = w.ctx, w.ctx.runtime
    t, pairs = c.t, c.eval_pairs
    rt.model.eval()
    order = np.argsort(pairs.tokens_per_pair, kind="stable")
    per_step = t.batch_size * c.world
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    # Every rank runs the same number of forward passes (sharded models gather
    # weights in forward); a rank with nothing left reruns a row and counts nothing.
    for start in range(0, len(order), per_step):
        rows = order[start:start + per_step][c.rank * t.batch_size:(c.rank + 1) * t.batch_size]
        counted = len(rows) > 0
        mb = collate(pairs, rows if counted else order[:1], rt.pad_id, rt.layout).to(rt.device)
        with rt.autocast:
            chosen, rejected = sequence_logps(rt.model, mb.inputs, average=t.average_logps)
            out = micro_batch_losses(t, chosen, rejected, mb)
        if counted:
            stats += _batch_stats(out, chosen, rejected, mb)
    rt.model.train()
    return _averages(_all_reduce(stats), prefix="eval/")


# --------------------------------------------------------------------------- helpers


def micro_batch_losses(t: TrainConfig, chosen, rejected, mb):
    ref_c, ref_r = (mb.ref_chosen, mb.ref_rejected) if needs_reference(t.loss_types) else (None, None)
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
    step = w.state.step
    record = {"step": step, "epoch": (step - 1) // w.ctx.steps_per_epoch, **_averages(result.stats),
              "learning_rate": result.learning_rate, "grad_norm": _finite(result.grad_norm),
              "tokens_per_second": round(float(result.stats[STATS.index("tokens")]) / max(result.seconds, 1e-9), 1)}
    if w.ctx.t.on_nonfinite_loss == "skip":
        record["skipped_batches"] = w.state.skipped
    return record


def _log(w: Worker, record: dict) -> None:
    """metrics.jsonl, the progress line and the trackers (train.report_to), from rank 0."""
    if w.sinks.metrics_log:
        w.sinks.metrics_log.append(record)
        log.info(_progress(record, w.ctx.total_steps))
    w.sinks.trackers.log(record, record["step"])


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
    gathered = [None] * w.ctx.world
    if w.ctx.world > 1:
        dist.all_gather_object(gathered, bad_ids)
    else:
        gathered = [bad_ids]
    ids = sorted({p for ids in gathered for p in ids})
    where = f"pairs {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" if ids else "the gradient"
    return (f"non-finite loss at step {step} ({where}); lower train.learning_rate or train.beta, check those "
            "pairs, or set train.on_nonfinite_loss=skip to skip such batches")


def _maybe_wait_for_full_group(w: Worker, step: int) -> None:
    """debug.wait_for_full_group_at_step: a group below train.num_workers' max waits here until Ray Train's
    resize replaces it by a larger one, for at most run.stall_timeout_s (600 s if null): then it fails."""
    c = w.ctx
    if c.cfg.debug.wait_for_full_group_at_step != step or c.world >= c.t.max_workers:
        return
    limit = c.cfg.run.stall_timeout_s or 600.0
    log.warning("debug.wait_for_full_group_at_step=%d: a group of %d waits to grow to %d", step, c.world,
                c.t.max_workers)
    time.sleep(limit)
    raise RuntimeError(f"debug.wait_for_full_group_at_step={step}: the group of {c.world} worker(s) did not grow "
                       f"to {c.t.max_workers} in {limit:.0f} s")


def _maybe_fail(w: Worker, step: int) -> None:
    """debug.fail_at_step: one worker dies abruptly, on the first attempt only."""
    c = w.ctx
    if c.cfg.debug.fail_at_step != step or c.rank != min(1, c.world - 1):
        return
    marker = storage.join(c.train_dir, f".failed_at_step_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    log.warning("debug.fail_at_step=%d: rank %d exits now", step, c.rank)
    os._exit(1)
