"""CNN training and evaluation speed: the trainer's channels-last layout and small evaluation
batches against PyTorch's default layout and the MLP's large evaluation batch, side by side.

    python benchmarks/cnn_speed.py                  # 16 and 32 channels, 5 repeats, 1 thread
    python benchmarks/cnn_speed.py --channels 16 --repeats 3 --threads 2

Both sides build the same model (``pipeline.training.models.build_model``: two conv blocks, one
hidden layer of 128, batch norm) and time, on the same random 28x28 tensors (the speed does not
depend on the pixel values), (a) an epoch's worth of SGD-with-momentum updates on batches of 128
gathered by index, as the trainer does, and (b) scoring 12,000 images, the size of Fashion-MNIST's
validation split. The reference is the layout and evaluation batch the trainer used before
(NCHW, batches of 4,096); ours is what it uses now (``memory_format=torch.channels_last`` on the
model, batches of ``CONV_EVAL_BATCH``). The sides alternate within each repeat; the table shows
medians of images/s and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.training.models import build_model
from pipeline.training.trainer import CONV_EVAL_BATCH, EVAL_BATCH

N_TRAIN, N_EVAL, BATCH = 10_240, 12_000, 128


def side(channels: int, channels_last: bool):
    model = build_model(TrainConfig(arch="cnn", channels=channels, conv_blocks=2, depth=1,
                                    width=128, batch_norm=True), (1, 28, 28), 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train_rate(model, opt, x, y, gen) -> float:
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    t0 = time.perf_counter()
    for i in range(0, len(x), BATCH):
        idx = perm[i:i + BATCH]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(x) / (time.perf_counter() - t0)


def eval_rate(model, x, batch) -> float:
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch]).argmax(1)
    return len(x) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", default="16,32", help="first block's channels, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TRAIN, 1, 28, 28, generator=gen), torch.randint(0, 10, (N_TRAIN,))
    xe = torch.randn(N_EVAL, 1, 28, 28, generator=gen)
    print(f"threads {args.threads}, {args.repeats} repeats, medians (images/s)")
    print("| channels | step | reference (NCHW, eval batch "
          f"{EVAL_BATCH}) | ours (channels-last, eval batch {CONV_EVAL_BATCH}) | ours/reference |")
    print("|---:|---|---:|---:|---:|")
    for channels in map(int, args.channels.split(",")):
        ref, ours = side(channels, False), side(channels, True)
        rates = {k: [] for k in ("train ref", "train ours", "eval ref", "eval ours")}
        for r in range(args.repeats + 1):  # the first repeat warms up and is dropped
            order = [("ref", ref, EVAL_BATCH), ("ours", ours, CONV_EVAL_BATCH)]
            for name, (model, opt), batch in order if r % 2 else order[::-1]:
                t, e = train_rate(model, opt, x, y, gen), eval_rate(model, xe, batch)
                if r:
                    rates[f"train {name}"].append(t)
                    rates[f"eval {name}"].append(e)
        for step in ("train", "eval"):
            a, b = rates[f"{step} ref"], rates[f"{step} ours"]
            ratio = statistics.median(o / f for o, f in zip(b, a, strict=True))
            print(f"| {channels} | {step} | {statistics.median(a):,.0f} | "
                  f"{statistics.median(b):,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
