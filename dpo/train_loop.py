"""The per-worker DPO training loop that Ray Train runs on every worker.

The policy's log-probs come from one forward pass per micro-batch (chosen and
rejected rows together); the reference's come from the dataset, scored once
offline, so no reference model is ever loaded here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from typing import Optional

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dpo import checkpoint as ckpt
from dpo import storage
from dpo.batching import Pairs, collate, epoch_plan, policy_logps, rank_micro_batches, use_packing
from dpo.config import Config, TrainConfig
from dpo.losses import LossType, preference_loss
from dpo.sharding import clip_grad_norm, gradient_sync, load_policy

log = logging.getLogger("raydpo.train")

# Per-step sums all-reduced across ranks, then divided by the pair count.
STATS = ["pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "tokens", "nonfinite"]
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
ERROR_FILE = "error.txt"


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.model_validate(config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    train_dir = storage.join(cfg.run.output_dir, "train")
    ckpt.seed_everything(cfg.run.seed)

    # Every rank sees the whole dataset, mapped from the node's one copy in the object store: see dpo.batching.
    train_pairs = Pairs.from_batch(ray.get(config["train_pairs"]))
    eval_pairs = Pairs.from_batch(ray.get(config["eval_pairs"])) if config["eval_pairs"] is not None else None
    global_batch = t.batch_size * world * t.grad_accum
    steps_per_epoch = len(train_pairs) // global_batch
    total = min(t.max_steps or t.epochs * steps_per_epoch, t.epochs * steps_per_epoch)

    model = load_policy(cfg, device, rank)
    pad_id = _pad_id(model)
    # bf16 autocast only where it is fast and asked for; CPU trains in float32.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if t.use_gpu and cfg.model.dtype == "bfloat16"
                else contextlib.nullcontext())
    packed = use_packing(t.packing, model, train_pairs, pad_id, autocast)
    if t.strategy == "ddp":
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total))

    start, skipped = _restore(model, optimizer, scheduler, rank, storage.join(train_dir, "checkpoints"),
                              sharded=t.strategy == "fsdp")
    metrics_log = ckpt.MetricsLog(storage.join(train_dir, "metrics.jsonl")) if rank == 0 else None
    board = _tensorboard(storage.join(train_dir, "tensorboard")) if rank == 0 and t.tensorboard else None
    if metrics_log:
        metrics_log.truncate_after(start)
        log.info("training %d pairs, %d steps of %d pairs (%d per worker x %d workers x %d accumulation), "
                 "packing %s, resuming after step %d", len(train_pairs), total, global_batch, t.batch_size,
                 world, t.grad_accum, "on" if packed else "off", start)

    plan_epoch, plan = None, None
    last: dict = {}
    model.train()
    for step in range(start + 1, total + 1):
        epoch, index = divmod(step - 1, steps_per_epoch)
        if plan_epoch != epoch:
            plan_epoch, plan = epoch, epoch_plan(train_pairs.tokens, global_batch, t.length_group_batches,
                                                 cfg.run.seed, epoch)
        _maybe_fail(cfg, step, rank, world, train_dir)
        t0 = time.perf_counter()
        stats = torch.zeros(len(STATS), dtype=torch.float64)
        bad_ids: list[str] = []
        micro = rank_micro_batches(plan[index], rank, world, t.grad_accum)
        for a, rows in enumerate(micro):
            mb = collate(train_pairs, rows, pad_id, packed).to(device)
            # Gradients are reduced across ranks on the last micro-step only.
            with gradient_sync(model, a == len(micro) - 1), autocast:
                chosen, rejected = policy_logps(model, mb, average=t.average_logps)
                out = _losses(t, chosen, rejected, mb)
                (out.losses.sum() / (t.batch_size * t.grad_accum)).backward()
            stats += _batch_stats(out, chosen, rejected, mb)
            bad_ids += [p for p, ok in zip(mb.pair_ids, torch.isfinite(out.losses.detach()).tolist()) if not ok]
        grad_norm = clip_grad_norm(model, t.max_grad_norm)
        stats = _all_reduce(stats)
        lr = scheduler.get_last_lr()[0]
        if stats[STATS.index("nonfinite")] > 0 or not math.isfinite(grad_norm):
            if t.on_nonfinite_loss == "error":
                _stop_nonfinite(step, bad_ids, rank, world, train_dir)
                return
            skipped += 1  # the batch is consumed, the weights stay as they were
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        elapsed = time.perf_counter() - t0
        do_eval = eval_pairs is not None and (step == total or (t.eval_every and step % t.eval_every == 0))
        if step % t.log_every == 0 or step == total or do_eval:
            last = _metrics(stats, step, epoch, lr, grad_norm, elapsed)
            if t.on_nonfinite_loss == "skip":
                last["skipped_batches"] = skipped
            if do_eval:
                last.update(evaluate(model, eval_pairs, t, rank, world, pad_id, packed, device, autocast))
            if metrics_log:
                metrics_log.append(last)
                log.info(_progress(last, total))
            if board:
                for key, value in last.items():
                    if isinstance(value, float) and key != "epoch":
                        board.add_scalar(key, value, step)
                board.flush()
        if step % t.checkpoint_every == 0 or step == total:
            _save(model, optimizer, scheduler, step, epoch, skipped, rank, t, train_dir, last)

    if eval_pairs is not None and start >= total:  # nothing left to train: still report the held-out numbers
        last = evaluate(model, eval_pairs, t, rank, world, pad_id, packed, device, autocast)
    if t.save_policy:
        _save_policy(model, cfg, rank, storage.join(train_dir, "policy"))
    ray.train.report({**last, "done": True})


# --------------------------------------------------------------------------- helpers


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


def _tensorboard(folder: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(folder)


def _pad_id(model) -> int:
    # Padding is masked out of attention and labels; any valid id will do.
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(model.config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _losses(t: TrainConfig, chosen, rejected, mb):
    needs_reference = any(LossType.parse(name).needs_reference for name in t.loss_types)
    ref_c, ref_r = (mb.ref_chosen, mb.ref_rejected) if needs_reference else (None, None)
    len_c, len_r = mb.chosen_lengths, mb.rejected_lengths
    if t.average_logps:
        # The cached reference scores are sums: put them on the same per-token scale.
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


def _metrics(stats: torch.Tensor, step: int, epoch: int, lr: float, grad_norm: float, elapsed: float,
             prefix: str = "") -> dict:
    s = dict(zip(STATS, stats.tolist()))
    n = max(s["pairs"], 1.0)
    record = {} if prefix else {"step": step, "epoch": epoch}
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        record[prefix + key] = _finite(s[key] / n)
    if not prefix:
        record.update(learning_rate=lr, grad_norm=_finite(grad_norm),
                      tokens_per_second=round(s["tokens"] / max(elapsed, 1e-9), 1))
    return record


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


@torch.no_grad()
def evaluate(model, pairs: Pairs, t: TrainConfig, rank: int, world: int, pad_id: int, packed: bool, device,
             autocast) -> dict:
    """Held-out loss, implicit rewards and reward accuracy, averaged over every eval pair once."""
    model.eval()
    order = np.argsort(pairs.tokens, kind="stable")
    per_step = t.batch_size * world
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    # Every rank runs the same number of forward passes (sharded models gather
    # weights in forward); a rank with nothing left reruns a row and counts nothing.
    for start in range(0, len(order), per_step):
        rows = order[start:start + per_step][rank * t.batch_size:(rank + 1) * t.batch_size]
        counted = len(rows) > 0
        mb = collate(pairs, rows if counted else order[:1], pad_id, packed).to(device)
        with autocast:
            chosen, rejected = policy_logps(model, mb, average=t.average_logps)
            out = _losses(t, chosen, rejected, mb)
        if counted:
            stats += _batch_stats(out, chosen, rejected, mb)
    model.train()
    return _metrics(_all_reduce(stats), 0, 0, 0.0, 0.0, 1.0, prefix="eval/")


def _stop_nonfinite(step: int, bad_ids: list[str], rank: int, world: int, train_dir: str) -> None:
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, bad_ids)
    else:
        gathered = [bad_ids]
    ids = sorted({p for ids in gathered for p in ids})
    where = f"pairs {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" if ids else "the gradient"
    message = (f"non-finite loss at step {step} ({where}); lower train.learning_rate or train.beta, check those "
               "pairs, or set train.on_nonfinite_loss=skip to skip such batches")
    # Every rank ends cleanly (raising would make Ray Train retry a deterministic failure);
    # the driver finds the message here.
    if rank == 0:
        storage.write_text(storage.join(train_dir, ERROR_FILE), message)


def _maybe_fail(cfg: Config, step: int, rank: int, world: int, train_dir: str) -> None:
    """debug.fail_at_step: one worker dies abruptly, on the first attempt only."""
    if cfg.debug.fail_at_step != step or rank != min(1, world - 1):
        return
    marker = storage.join(train_dir, f".failed_at_step_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    log.warning("debug.fail_at_step=%d: rank %d exits now", step, rank)
    os._exit(1)


def _restore(model, optimizer, scheduler, rank: int, own_root: str, sharded: bool) -> tuple[int, int]:
    """Load the newest checkpoint (Ray's or ours) into model, optimizer, scheduler and RNG.

    Returns its step and the batches skipped as non-finite up to it. Sharded,
    only rank 0 reads the full states and the others receive their shards.
    """
    with ckpt.newest(ray.train.get_checkpoint(), own_root) as folder:
        if folder is None:
            return 0, 0
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
        reads = rank == 0 or not sharded
        set_model_state_dict(model, ckpt.load(folder, "model.pt") if reads else {}, options=options)
        set_optimizer_state_dict(model, optimizer, ckpt.load(folder, "optimizer.pt") if reads else {},
                                 options=options)
        scheduler.load_state_dict(ckpt.load(folder, "scheduler.pt"))
        ckpt.set_rng_state(ckpt.load(folder, "rng.pt")[rank])
        state = ckpt.read_state(folder)
        return int(state["step"]), int(state["skipped_batches"])


def _save(model, optimizer, scheduler, step: int, epoch: int, skipped: int, rank: int, t: TrainConfig,
          train_dir: str, metrics: dict) -> None:
    # Gathering full state dicts is collective under FSDP: every rank takes part.
    model_state = get_model_state_dict(model, options=FULL_STATE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    rng = ckpt.rng_state()
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="dpo-ckpt-") as tmp:
        ckpt.write(tmp, model_state=model_state, optimizer_state=optimizer_state,
                   scheduler_state=scheduler.state_dict(), rng_states=rngs, step=step, epoch=epoch,
                   skipped_batches=skipped)
        ckpt.publish(tmp, storage.join(train_dir, "checkpoints"), step, t.keep_checkpoints)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{step:08d}")


def _save_policy(model, cfg: Config, rank: int, dest: str) -> None:
    """The trained weights and the tokenizer, in Hugging Face format."""
    state = get_model_state_dict(model, options=FULL_STATE)
    if rank != 0:
        return
    from transformers import AutoTokenizer

    inner = getattr(model, "module", model)
    with tempfile.TemporaryDirectory(prefix="dpo-policy-") as tmp:
        inner.save_pretrained(tmp, state_dict=state)
        AutoTokenizer.from_pretrained(cfg.model.tokenizer_path,
                                      trust_remote_code=cfg.model.trust_remote_code).save_pretrained(tmp)
        storage.delete_dir(dest)
        fs, path = storage.resolve(dest)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
