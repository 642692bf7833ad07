"""InfoNCE under DDP: 2 gloo processes give the loss of the single-process global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from mneme.app.nn.losses import AlignmentLoss

WORLD_SIZE, LOCAL_BATCH, DIM = 2, 6, 8


def global_batch():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=g), dim=1)
    b = F.normalize(torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=g), dim=1)
    labels = torch.randint(0, 3, (WORLD_SIZE * LOCAL_BATCH,), generator=g)
    return a, b, labels, torch.tensor(10.0)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        a, b, labels, scale = global_batch()
        shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss_fn = AlignmentLoss(gather_with_grad=True, rank=rank, world_size=WORLD_SIZE)
        a_local = a[shard].clone().requires_grad_(True)
        plain = loss_fn(a_local, b[shard], scale)
        aware = loss_fn(a_local, b[shard], scale, labels=labels[shard])
        plain.backward()  # gradients flow through the gather
        assert a_local.grad is not None and a_local.grad.abs().sum() > 0
        torch.save({"plain": plain.detach(), "aware": aware.detach()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_on_two_ranks_equals_single_process_loss(tmp_path):
    # forked, as the ddp_fork tests: a spawned child would import torch and this module again
    mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True,
        start_method="fork",
    )  # fmt: skip
    a, b, labels, scale = global_batch()
    single = AlignmentLoss()
    expected_plain = single(a, b, scale)
    expected_aware = single(a, b, scale, labels=labels)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["plain"], expected_plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["aware"], expected_aware, atol=1e-5, rtol=0)
