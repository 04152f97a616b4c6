#!/usr/bin/env python3
"""The reference: the same `cnn` trained with PyTorch in Python on the same data.

Reads the IDX files itself (no torchvision, no numpy), keeps the data set in one
tensor as the Rust core does, and times the training loop only. Prints one JSON
object. Used by `cargo bench -p p2pml-node --bench train_vs_pytorch`.
"""
import argparse, gzip, json, os, struct, time

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training set statistics


class Net(nn.Module):
    """The PyTorch MNIST example network (same names as p2pml's `cnn`)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


def read_idx(path):
    for p in (path, path + ".gz"):
        if os.path.exists(p):
            raw = open(p, "rb").read()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            ndims = raw[3]
            dims = struct.unpack(">" + "I" * ndims, raw[4 : 4 + 4 * ndims])
            return torch.frombuffer(bytearray(raw[4 + 4 * ndims :]), dtype=torch.uint8).view(*dims)
    raise SystemExit(f"error: {path}[.gz] not found")


def load(data_dir, prefix, limit):
    x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if limit:
        x, y = x[:limit], y[:limit]
    x = ((x.float() / 255.0) - MEAN) / STD
    return x.unsqueeze(1).contiguous(), y.long()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--limit-train", type=int, default=0)
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    xtr, ytr = load(a.data_dir, "train", a.limit_train)
    xte, yte = load(a.data_dir, "t10k", a.limit_test)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    epochs = []
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        start = time.perf_counter()
        samples = 0
        for i in range(0, len(ytr), a.batch_size):
            idx = perm[i : i + a.batch_size]
            x, y = xtr.index_select(0, idx), ytr.index_select(0, idx)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            samples += len(idx)
        secs = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(yte), 1000):
                correct += (model(xte[i : i + 1000]).argmax(1) == yte[i : i + 1000]).sum().item()
        epochs.append({"epoch": epoch + 1, "samples": samples, "train_seconds": secs,
                       "samples_per_second": samples / secs, "test_accuracy": correct / len(yte)})
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "epochs": epochs}))


if __name__ == "__main__":
    main()
