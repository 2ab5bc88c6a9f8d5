"""What saving costs rank 0 under train.strategy=fsdp: a checkpoint and policy/, gathered against sharded.

    python bench/fsdp_save_memory.py [--preset medium] [--ranks 2]

As bench/fsdp_load_memory.py does for loading, `--ranks` processes in one gloo
group on this machine load the policy with dpo.sharding.load_policy (fsdp),
make its AdamW state with one step, and then save one thing, each in a fresh
group so that memory freed by one does not hide the next one's:

    checkpoint, gathered   before: full model and optimizer state dicts on rank 0's CPU, torch.save'd
    checkpoint, sharded    now: dpo.checkpoint.write_shards (torch.distributed.checkpoint), each rank its shards
    policy/, gathered      before: the full model state dict on rank 0, save_pretrained
    policy/, sharded       now: dpo.export.write_safetensors, one tensor gathered at a time

Per rank: the peak RSS while saving minus the RSS before it (VmHWM reset
through /proc/self/clear_refs), beside the bound the issue sets: the rank's
own shard (fp32 weights and AdamW's two moments) plus the largest layer (the
fp32 weights of the largest FSDP unit: a decoder layer, or the root's
embeddings, final norm and output head).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from fsdp_load_memory import run_ranks
from train_throughput import reset_peak, status_mib

MIB = 2**20
KINDS = ["checkpoint-gathered", "checkpoint-sharded", "policy-gathered", "policy-sharded"]


def largest_unit_bytes(model) -> int:
    """The fp32 bytes of the largest FSDP unit, whole: each decoder layer, and the root's own parameters."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    in_layers = {id(p) for m in units if m is not model for p in m.parameters()}
    sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in units if m is not model]
    sizes.append(sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers))
    return max(sizes)


def child(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from dpo import checkpoint as ckpt
    from dpo.config import load_config
    from dpo.export import write_safetensors
    from dpo.sharding import load_policy
    from dpo.export import LM_PREFIX

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, [f"model.policy={args.model}", "train.strategy=fsdp"])
    model = load_policy(cfg, torch.device("cpu"), rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # a step as training takes one: AdamW's moments now exist, and every weight is written
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    own = sum(t.to_local().numel() * t.element_size() for s in optimizer.state.values()
              for t in s.values() if t.dim() > 0) + sum(p.to_local().numel() * p.element_size()
                                                       for p in model.parameters())
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = os.path.join(args.out, args.child)
    dist.barrier()
    reset_peak()
    base = status_mib("VmRSS")
    if args.child == "checkpoint-gathered":
        model_state = get_model_state_dict(model, options=full)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
        if rank == 0:
            os.makedirs(out)
            torch.save(model_state, os.path.join(out, "model.pt"))
            torch.save(optimizer_state, os.path.join(out, "optimizer.pt"))
        del model_state, optimizer_state
    elif args.child == "checkpoint-sharded":
        ckpt.write_shards(out, {"model": get_model_state_dict(model),
                                "optimizer": get_optimizer_state_dict(model, optimizer)})
    elif args.child == "policy-gathered":
        state = get_model_state_dict(model, options=full)
        if rank == 0:
            model.lm.save_pretrained(out, state_dict={k.removeprefix(LM_PREFIX): v for k, v in state.items()})
        del state
    else:
        write_safetensors({k.removeprefix(LM_PREFIX): v for k, v in get_model_state_dict(model).items()}, out,
                          rank=rank)
    dist.barrier()
    peak = status_mib("VmHWM")
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) if rank == 0 else 0
    print(json.dumps({"rank": rank, "save_peak_mib": peak - base, "own_shard_mib": own / MIB,
                      "largest_unit_mib": largest_unit_bytes(model) / MIB, "written_mib": written / MIB,
                      "params": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from pipeline.models import build_local_model, iter_texts

    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data", "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-save-") as tmp:
        model = build_local_model(os.path.join(tmp, "model"), iter_texts([examples]), preset=args.preset, seed=0)
        results = {kind: run_ranks(__file__, args.ranks, ["--child", kind, "--model", model, "--out", tmp])
                   for kind in KINDS}
    first = results[KINDS[0]][0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"preset {args.preset}, {args.ranks} ranks; per rank 0: own shard {first['own_shard_mib']:.0f} MiB "
          f"(fp32 weights + AdamW moments), largest layer {first['largest_unit_mib']:.0f} MiB")
    print(f"{'MiB, peak while saving':30}" + "".join(f"{f'rank {r}':>10}" for r in range(args.ranks))
          + f"{'bound r0':>10}{'written':>10}")
    for kind in KINDS:
        rows = results[kind]
        bound = rows[0]["own_shard_mib"] + rows[0]["largest_unit_mib"]
        print(f"{kind:30}" + "".join(f"{r['save_peak_mib']:10.0f}" for r in rows)
              + f"{bound:10.0f}{rows[0]['written_mib']:10.0f}")


if __name__ == "__main__":
    main()
