"""The main job: train the text classifier twice, stock torch.nn vs fastattn.convert()-ed, and compare.

    python -m fastattn.demo                       # embedded synthetic data, CPU, ~1-3 minutes
    python -m fastattn.demo --data aclImdb/ --epochs 1 --device cuda

Both runs start from the same initial weights and see the same batches in the same order with the
same seeds; they train in lockstep (a step of one, then the same step of the other), so both step
times are taken under the same machine load. Printed: the data set, per-step time of each run, the
speedup, final training loss and test accuracy of each; a PNG plot of both loss and accuracy
curves is written to --out.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as _data
from .models import TextClassifier
from .modules import convert

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastattn.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", metavar="DIR", help="an aclImdb-layout directory (train/pos, train/neg, test/pos, "
                   "test/neg of .txt reviews); default: the embedded synthetic data set")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 1 for "
                   "--data; for synthetic data --steps decides)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (overrides --epochs; "
                   "default 800 on synthetic data)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence in tokens (synthetic default 32, "
                   "aclImdb default 256)")
    p.add_argument("--vocab-size", type=int, default=20000, help="aclImdb vocabulary size (default 20000)")
    p.add_argument("--limit", type=int, default=None, help="aclImdb: at most this many reviews per split")
    p.add_argument("--train-size", type=int, default=16000, help="synthetic training sequences (the default "
                   "run sees each about once)")
    p.add_argument("--test-size", type=int, default=1000, help="synthetic test sequences (default 1000)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--backend", default=None, help="fastattn backend: cuda, triton, cpu or reference "
                   "(default: automatic, the fastest available)")
    p.add_argument("--embedding-dim", type=int, default=100, help="model width (default 100, the classifier's)")
    p.add_argument("--nhead", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--num-layers", type=int, default=2, help="encoder layers (default 2)")
    p.add_argument("--dim-feedforward", type=int, default=2048,
                   help="feed-forward width (default 2048, the classifier's)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the model (default 0, so both runs "
                   "see identical arithmetic and their curves can be compared step by step)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="Adam learning rate (default 3e-4; 1e-3 left the 100/2048 model at chance in 500 steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights and batch order (default 0)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations "
                   "(default: 10 points per run)")
    p.add_argument("--out", default=os.path.join("demo_out", "training.png"),
                   help="PNG plot path (default demo_out/training.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "steps", "max_len", "train_size", "test_size", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} got {value}; expected a positive integer")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout got {args.dropout}; expected a value in [0, 1)")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: TextClassifier, split: _data.Split, device: torch.device, batch_size: int = 256
             ) -> tuple[float, float]:
    """(mean BCE loss, accuracy) of ``model`` on ``split`` in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(split)))
        tokens, mask, labels = split.batch(idx, device)
        logits = model(tokens, mask).squeeze(-1)
        total_loss += float(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
        correct += int(((logits > 0).float() == labels).sum())
    model.train(was_training)
    return total_loss / len(split), correct / len(split)


def bag_of_words_baseline(data: _data.TextData, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a logistic regression on word counts: what attention-free models reach.

    The score is the sum of one learned weight per token (so a linear function of the word counts),
    computed by gathering weights rather than building a (documents x vocabulary) count matrix.
    """
    def score(split: _data.Split, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (w[split.tokens] * (split.tokens != _data.PAD)).sum(1) + b

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(data.vocab_size, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(score(data.train, w, b), data.train.labels)
        (loss + 1e-4 * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        return float(((score(data.test, w, b) > 0).float() == data.test.labels).float().mean())


def resolved_backend(explicit: Optional[str], device: torch.device, head_dim: int) -> str:
    """The backend name fastattn picks for the model's attention calls (explicit, or the automatic one)."""
    try:
        from .attention import chosen_backend, make_call

        q = torch.zeros(1, 1, 2, head_dim, device=device)
        return chosen_backend(make_call(q, q, q), explicit)
    except Exception:  # only a label for the printout; the training calls report real errors themselves
        return explicit or "automatic"


def _batches(num: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The one batch order both runs use: reshuffled every epoch, a fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(num, generator=gen)
        for start in range(0, num - batch_size + 1, batch_size):
            out.append(perm[start:start + batch_size])
            if len(out) == steps:
                break
    return out


class _Run:
    """One training run: its model, optimizer, random-number state and history."""

    def __init__(self, model: TextClassifier, label: str, lr: float, seed: int, device: torch.device):
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        # Each run keeps its own generator state, so dropout (if any) draws as if it ran alone.
        gen = torch.Generator().manual_seed(seed)
        self.cpu_rng = gen.get_state()
        self.cuda_rng = None
        if device.type == "cuda":
            cuda_gen = torch.Generator(device).manual_seed(seed)
            self.cuda_rng = cuda_gen.get_state()
        self.device = device
        self.history = {"label": label, "loss": [], "step_time": [], "eval_step": [], "test_acc": [],
                        "test_loss": []}

    def step(self, tokens, mask, labels) -> float:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(self.model(tokens, mask).squeeze(-1), labels)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        self.history["step_time"].append(time.perf_counter() - t0)
        self.cpu_rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state(self.device)
        self.history["loss"].append(loss.detach().item())
        return self.history["loss"][-1]


def train(models: list[tuple[str, TextClassifier]], data: _data.TextData, batches: list[torch.Tensor], args,
          device: torch.device) -> list[dict]:
    """Train the models in lockstep, step i of each on batch i, so that both step-time series are taken
    under the same machine conditions; returns each run's history (losses, step times, test curve)."""
    from tqdm import tqdm

    runs = [_Run(model, label, args.lr, args.seed + 1, device) for label, model in models]
    steps = len(batches)
    eval_every = args.eval_every or max(1, steps // 10)
    bar = tqdm(total=steps, desc="training both", disable=args.no_progress, file=sys.stderr, leave=True)
    for step, idx in enumerate(batches, start=1):
        tokens, mask, labels = data.train.batch(idx, device)
        for run in runs:
            run.step(tokens, mask, labels)
        if step % eval_every == 0 or step == steps:
            for run in runs:
                test_loss, test_acc = evaluate(run.model, data.test, device)
                run.history["eval_step"].append(step)
                run.history["test_acc"].append(test_acc)
                run.history["test_loss"].append(test_loss)
            bar.set_postfix(loss=" / ".join(f"{r.history['loss'][-1]:.3f}" for r in runs),
                            test_acc=" / ".join(f"{r.history['test_acc'][-1]:.1%}" for r in runs))
        bar.update(1)
    bar.close()
    out = []
    for run in runs:
        h = run.history
        warm = h["step_time"][min(3, steps - 1):]  # the first steps pay one-off allocation costs
        h["median_step_s"] = statistics.median(warm)
        h["mean_step_s"] = statistics.fmean(warm)
        h["final_loss"] = statistics.fmean(h["loss"][-max(1, min(20, steps // 5)):])
        h["final_test_acc"] = h["test_acc"][-1]
        out.append(h)
    return out


def plot(histories: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for h, style in zip(histories, ("-", "--")):
        steps = range(1, len(h["loss"]) + 1)
        ax_loss.plot(steps, h["loss"], style, alpha=0.8, lw=1, label=h["label"])
        ax_acc.plot(h["eval_step"], h["test_acc"], style + "o" if style == "-" else style + "s", ms=4,
                    label=h["label"])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (BCE)")
    ax_loss.set_title("training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax_acc.set_title("test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    import fastattn

    if args.data:
        max_len = args.max_len or 256
        data = _data.load_aclimdb(args.data, vocab_size=args.vocab_size, max_len=max_len, limit=args.limit,
                                  seed=args.seed)
        default_steps = None
    else:
        max_len = args.max_len or 32
        data = _data.make_synthetic(args.train_size, args.test_size, min_len=min(8, max_len), max_len=max_len,
                                    seed=args.seed)
        default_steps = 800
    print(data.description)
    sample = data.train.tokens[0, : int(data.train.lengths[0])]
    print(f"  example: \"{data.decode(sample)}\" -> label {int(data.train.labels[0])}")
    bow = bag_of_words_baseline(data, seed=args.seed)
    print(f"  bag-of-words logistic regression (no attention), test accuracy: {bow:.1%}")

    per_epoch = max(1, len(data.train) // args.batch_size)
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None or default_steps is None:
        steps = (args.epochs or 1) * per_epoch
    else:
        steps = default_steps
    batch_size = min(args.batch_size, len(data.train))
    batches = _batches(len(data.train), batch_size, steps, args.seed)

    torch.manual_seed(args.seed)
    stock = TextClassifier(data.vocab_size, args.embedding_dim, args.nhead, args.num_layers, args.dim_feedforward,
                           dropout=args.dropout, max_len=max_len).to(device)
    fast = convert(copy.deepcopy(stock), backend=args.backend)
    backend = resolved_backend(args.backend, device, args.embedding_dim // args.nhead)
    if args.backend is None:
        backend += ", automatic"
    print(f"model: TextClassifier(embedding {args.embedding_dim}, {args.nhead} heads, {args.num_layers} layers, "
          f"feed-forward {args.dim_feedforward}, dropout {args.dropout}), "
          f"{sum(p.numel() for p in stock.parameters())} parameters; {steps} steps of batch {batch_size} "
          f"on {device}; fastattn backend: {backend} (available: {', '.join(fastattn.available_backends())}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    runs = train([("torch.nn", stock), (f"fastattn ({backend})", fast)], data, batches, args, device)
    t, f = runs
    speedup = t["median_step_s"] / f["median_step_s"]
    gaps = [abs(a - b) for a, b in zip(t["loss"], f["loss"])]
    gap, early = max(gaps), min(50, len(gaps))
    width = max(len(t["label"]), len(f["label"]))
    print()
    rows = [("", t["label"], f["label"]),
            ("step time, median (ms)", f"{t['median_step_s'] * 1e3:.2f}", f"{f['median_step_s'] * 1e3:.2f}"),
            ("step time, mean (ms)", f"{t['mean_step_s'] * 1e3:.2f}", f"{f['mean_step_s'] * 1e3:.2f}"),
            ("final training loss", f"{t['final_loss']:.4f}", f"{f['final_loss']:.4f}"),
            ("test accuracy", f"{t['final_test_acc']:.1%}", f"{f['final_test_acc']:.1%}")]
    for name, a, b in rows:
        print(f"{name:24}{a:>{width}}  {b:>{width}}")
    print(f"speedup of fastattn over torch.nn (median step time): {speedup:.2f}x")
    print(f"largest per-step training-loss difference between the runs: {max(gaps[:early]):.2e} in the first "
          f"{early} steps, {gap:.2e} over all (rounding differences grow once the model starts to learn)")
    print(f"chance: 50.0%; bag-of-words: {bow:.1%}")
    title = (f"{data.name} data: torch.nn vs fastattn ({backend}) on {device}, "
             f"{steps} steps; speedup {speedup:.2f}x")
    plot(runs, args.out, title)
    print(f"plot written to {args.out}")
    return {"data": data.name, "runs": runs, "speedup": speedup, "bag_of_words_acc": bow,
            "max_loss_gap": gap, "out": args.out, "steps": steps}


if __name__ == "__main__":
    main()
