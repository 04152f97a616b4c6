#!/usr/bin/env python3
"""Load a p2pml `cnn` model in PyTorch and evaluate it: the example for users.

    .venv/bin/python scripts/pytorch_load.py out/demo/model.safetensors [--data-dir DIR]

The safetensors file holds PyTorch-named tensors (conv1.weight, ...) and, in its
metadata, what the input must look like: input_shape, mean, std, classes.
Prints one JSON object: the metadata and the test accuracy.
"""
import argparse, json, os, sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from pytorch_train import Net, read_idx  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--limit-test", type=int, default=0)
    a = ap.parse_args()
    with safe_open(a.model, "pt") as f:
        meta = f.metadata()
    if meta.get("model") != "cnn":
        raise SystemExit(f"error: this example defines the cnn network; the file holds {meta.get('model')}")
    shape = json.loads(meta["input_shape"])
    mean = torch.tensor(json.loads(meta["mean"])).view(-1, 1, 1)
    std = torch.tensor(json.loads(meta["std"])).view(-1, 1, 1)
    classes = json.loads(meta["classes"])
    net = Net(classes=len(classes))
    net.load_state_dict(load_file(a.model), strict=True)
    net.eval()
    x = read_idx(os.path.join(a.data_dir, "t10k-images-idx3-ubyte"))
    y = read_idx(os.path.join(a.data_dir, "t10k-labels-idx1-ubyte")).long()
    if a.limit_test:
        x, y = x[: a.limit_test], y[: a.limit_test]
    x = (x.float().view(-1, *shape) / 255.0 - mean) / std
    with torch.no_grad():
        pred = net(x).argmax(1)
    print(json.dumps({"metadata": meta, "test_accuracy": (pred == y).float().mean().item(),
                      "first_predictions": [classes[i] for i in pred[:3].tolist()]}))


if __name__ == "__main__":
    main()
