"""What loading the policy costs each training rank: train.strategy=ddp against fsdp.

    python bench/fsdp_load_memory.py [--preset gpu] [--ranks 2]

Each strategy runs `--ranks` processes in one gloo group on this machine, as
Ray Train's workers on one node would, and each process calls
dpo.sharding.load_policy on CPU exactly as the training loop does, then
writes every weight once in place, as the first optimizer step will (until
then, weights that safetensors memory-mapped are pages of the file, shared by
every process). Per rank: the peak RSS through both and the RSS after, minus
the RSS before (VmHWM reset through /proc/self/clear_refs), so Python and
torch themselves do not count. Their sum over ranks is what the node pays. The model is
pipeline.models' preset (default "gpu"; its tokenizer, trained on
examples/data, sets the vocabulary), randomly initialised: loading does not
care about the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

from train_throughput import reset_peak, status_mib


def child(args) -> None:
    import torch
    import torch.distributed as dist

    from dpo.config import load_config
    from dpo.sharding import load_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, [f"model.policy={args.model}", f"train.strategy={args.child}"])
    dist.barrier()
    reset_peak()
    base = status_mib("VmRSS")
    model = load_policy(cfg, torch.device("cpu"), rank)
    # Weights read from safetensors may still be pages of the mapped file, shared by every process that maps
    # it, until written: the first optimizer step writes them all, so write them here as it would.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    dist.barrier()
    peak, now = status_mib("VmHWM"), status_mib("VmRSS")
    params = sum(p.numel() for p in model.parameters())  # local: a shard under fsdp
    print(json.dumps({"rank": rank, "load_peak_mib": peak - base, "loaded_mib": now - base,
                      "local_params": params}))
    dist.destroy_process_group()


def run_group(args, strategy: str) -> list[dict]:
    return run_ranks(__file__, args.ranks, ["--child", strategy, "--model", args.model])


def run_ranks(script: str, ranks: int, argv: list[str]) -> list[dict]:
    """`script argv` as `ranks` processes of one gloo group; each prints its JSON row last. Rows by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"a rank of {' '.join(argv[:2])} failed ({proc.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from pipeline.models import build_local_model, iter_texts

    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data", "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        args.model = build_local_model(os.path.join(tmp, "model"), iter_texts([examples]), preset=args.preset,
                                       seed=0)
        weights_mib = os.path.getsize(os.path.join(args.model, "model.safetensors")) / 2**20
        results = {s: run_group(args, s) for s in ("ddp", "fsdp")}
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"preset {args.preset} ({results['ddp'][0]['local_params'] / 1e6:.0f}M parameters, "
          f"{weights_mib:.0f} MiB of fp32 weights), {args.ranks} ranks")
    print(f"{'MiB':28}{'ddp':>10}{'fsdp':>10}{'ratio':>8}")
    for key, name in (("load_peak_mib", "peak, load + write"), ("loaded_mib", "held after")):
        for rank in range(args.ranks):
            a, b = results["ddp"][rank][key], results["fsdp"][rank][key]
            print(f"{f'{name}, rank {rank}':28}{a:10.0f}{b:10.0f}{b / a:7.2f}x")
        a, b = (sum(r[key] for r in results[s]) for s in ("ddp", "fsdp"))
        print(f"{f'{name}, all ranks':28}{a:10.0f}{b:10.0f}{b / a:7.2f}x")


if __name__ == "__main__":
    main()
