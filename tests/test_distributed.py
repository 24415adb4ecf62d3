"""A fastattn-converted model trains under torch.distributed on the CPU (gloo, 2 processes).

Two processes each take half of a global batch; after a few SGD steps the losses and parameters must
equal one process training on the whole batch. The model runs in float64, so the only difference
is the order of the gradient reduction: the tolerance is float64 rounding, not a loose bound.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastattn

WORLD = 2
STEPS = 3
GLOBAL_BATCH, SEQ, D_MODEL = 8, 10, 32


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(D_MODEL, 4, 64, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x, key_padding_mask):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=key_padding_mask)
        return self.head(x).squeeze(-1)


def _model():
    torch.manual_seed(0)
    return fastattn.convert(Encoder()).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, GLOBAL_BATCH, SEQ, generator=gen, dtype=torch.float64)
    kpm = torch.zeros(STEPS, GLOBAL_BATCH, SEQ, dtype=torch.bool)
    kpm[:, 1::4, 7:] = True  # rows 1 and 5 padded: each half keeps as many tokens
    return x, y, kpm


def _loss(model, x, y, kpm):
    out = model(x, kpm)
    keep = ~kpm
    return ((out - y) ** 2 * keep).sum() / keep.sum()


def _train(model, rank=0, world=1):
    x, y, kpm = _data()
    per = GLOBAL_BATCH // world
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, ran_fastattn = [], False
    for step in range(STEPS):
        sl = slice(rank * per, (rank + 1) * per)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = _loss(model, x[step, sl], y[step, sl], kpm[step, sl])
            opt.zero_grad()
            loss.backward()
        ran_fastattn |= any(e.key == "fastattn::attention_bwd" for e in prof.key_averages())
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), ran_fastattn


def _full_params(model):
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = p.detach().clone()
    return out


def _worker(rank, port, mode, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        losses, ran = _train(model, rank, WORLD)
        params = _full_params(model.module if mode == "ddp" else model)
        torch.save({"losses": losses, "params": params, "ran_fastattn": ran},
                   os.path.join(result_dir, f"{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process():
    model = _model()
    losses, ran = _train(model)
    assert ran
    return losses, _full_params(model)


def _run(mode, tmp_path):
    mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{mode}-{r}.pt") for r in range(WORLD)]


def _check(results, tmp_path):
    want_losses, want_params = _single_process()
    init = dict(_model().named_parameters())
    assert all(not torch.equal(p, init[n]) for n, p in want_params.items()), "training must move every parameter"
    assert all(r["ran_fastattn"] for r in results), "fastattn's kernels did not run in every process"
    # the global loss is the token-weighted mean of the local ones
    _, _, kpm = _data()
    per = GLOBAL_BATCH // WORLD
    counts = torch.stack([(~kpm[:, r * per:(r + 1) * per]).sum(dim=(1, 2)) for r in range(WORLD)]).double()
    local = torch.stack([r["losses"] for r in results])
    got_losses = (local * counts).sum(0) / counts.sum(0)
    torch.testing.assert_close(got_losses, want_losses, rtol=0, atol=1e-12)
    for r in results:
        for name, p in want_params.items():
            torch.testing.assert_close(r["params"][name], p, rtol=0, atol=1e-12, msg=f"parameter {name}")


def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    results = _run("ddp", tmp_path)
    # DDP averages gradients over ranks: equal to the global loss's gradient only when both halves
    # hold the same number of kept tokens; the data is built so that they do.
    _, _, kpm = _data()
    per = GLOBAL_BATCH // WORLD
    assert (~kpm[:, :per]).sum() == (~kpm[:, per:]).sum()
    _check(results, tmp_path)


def test_fsdp2_gloo_two_processes_match_one_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard is missing in this torch")
    _check(_run("fsdp", tmp_path), tmp_path)
