"""A tiny hand-written tensor-parallel MLP model, run on CPU with gloo, captured by tensorlog.

Why: it produces real multi-rank runs (``.rank<R>`` files in one shared run
directory) whose module names match the TP=1 run, so tests can check that a
TP=2 capture reassembles to the TP=1 one (concatenate column-parallel outputs,
sum row-parallel partials) and that a perturbed shard is found where it is.

CLI: ``python tests/tp_model.py WORLD_SIZE OUTPUT_DIR RUN_NAME [--perturb-rank R]``
"""

from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tensorlog

HIDDEN = 32


class ColumnParallelLinear(nn.Module):
    """Holds ``out / world_size`` output rows; returns the local shard (no gather), as Megatron/vLLM do."""

    def __init__(self, in_features: int, out_features: int, world_size: int, rank: int) -> None:
        super().__init__()
        assert out_features % world_size == 0
        self.rank, self.n = rank, out_features // world_size
        self.weight = nn.Parameter(torch.empty(self.n, in_features))
        self.bias = nn.Parameter(torch.empty(self.n))

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy this rank's rows out of the full (TP=1) weight, so shards reassemble exactly."""
        rows = slice(self.rank * self.n, (self.rank + 1) * self.n)
        self.weight.copy_(weight[rows])
        self.bias.copy_(bias[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds ``in / world_size`` input columns; returns a partial sum (the caller all-reduces)."""

    def __init__(self, in_features: int, out_features: int, world_size: int, rank: int) -> None:
        super().__init__()
        assert in_features % world_size == 0
        self.rank, self.n = rank, in_features // world_size
        self.weight = nn.Parameter(torch.empty(out_features, self.n))
        self.bias = nn.Parameter(torch.empty(out_features))

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy this rank's columns; the bias counts on rank 0 only so the all-reduced sum equals TP=1."""
        self.weight.copy_(weight[:, self.rank * self.n : (self.rank + 1) * self.n])
        self.bias.copy_(bias if self.rank == 0 else torch.zeros_like(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Block(nn.Module):
    """Residual MLP; the all-reduce sits outside ``down`` so ``down`` logs the per-rank partial."""

    def __init__(self, hidden: int, world_size: int, rank: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.up = ColumnParallelLinear(hidden, 4 * hidden, world_size, rank)
        self.act = nn.GELU()
        self.down = RowParallelLinear(4 * hidden, hidden, world_size, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.act(self.up(x)))
        if self.world_size > 1:
            dist.all_reduce(y)
        return x + y


class TPModel(nn.Module):
    """Same module names for every world size; weights are the TP=1 weights, sliced per rank."""

    def __init__(self, hidden: int = HIDDEN, layers: int = 2, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, world_size, rank) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        g = torch.Generator().manual_seed(seed)  # full-size draws: identical on every rank and world size
        for block in self.layers:
            assert isinstance(block, Block)
            block.up.load_full(
                torch.randn(4 * hidden, hidden, generator=g) * hidden**-0.5, torch.randn(4 * hidden, generator=g) * 0.1
            )
            block.down.load_full(
                torch.randn(hidden, 4 * hidden, generator=g) * (4 * hidden) ** -0.5, torch.randn(hidden, generator=g) * 0.1
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.norm(x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, output_dir: str, run_name: str, perturb_rank: int | None) -> None:
    """One rank: join gloo, build the shard, capture one forward of a fixed input."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = TPModel(world_size=world_size, rank=rank).eval()
        if perturb_rank == rank:
            with torch.no_grad():
                model.layers[1].up.weight[0, 0] += 1e-2  # type: ignore[index]
        x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), tensorlog.capture(model, {"output_dir": output_dir, "run_name": run_name, "log_step_ids": [0]}):
            model(x)
    finally:
        dist.destroy_process_group()


def run_tp(world_size: int, output_dir: str, run_name: str, perturb_rank: int | None = None) -> None:
    """Capture one forward at ``world_size`` ranks into ``output_dir/run_name`` (shared by all ranks)."""
    port = _free_port()
    if world_size == 1:
        _worker(0, 1, port, output_dir, run_name, perturb_rank)
    else:
        mp.spawn(_worker, args=(world_size, port, output_dir, run_name, perturb_rank), nprocs=world_size, join=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("world_size", type=int)
    p.add_argument("output_dir")
    p.add_argument("run_name")
    p.add_argument("--perturb-rank", type=int, default=None)
    a = p.parse_args()
    run_tp(a.world_size, a.output_dir, a.run_name, a.perturb_rank)
