"""A deeper digits MLP whose two middle layers were trained for the same block structure: the lossy
chains benchmark (two consecutive lossy-split layers that line up).

    /path/to/venv-with-torch/bin/python tools/train_digits_chain.py build/digits_chain.onnx

Needs torch and scikit-learn (``pip install torch==2.13.0 scikit-learn onnx``; not dependencies of
onnx_split). Data, split and training recipe are those of tools/train_digits.py (60 epochs of Adam,
cosine decay, seeded, one thread); the network is 64 -> 1024 -> 1024 -> 1024 -> 10 (fc1 .. fc4), and
the group-lasso penalty of train_digits.py is put on *both* fc2 and fc3 with the same 8 groups of
the hidden layer between them, so fc2's output blocks are fc3's input blocks. The hidden units are
then shuffled (a seeded permutation per hidden layer, the function unchanged), so a tool must find
the blocks and their alignment itself. Writes the model and prints its test accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import GROUPS, OPSET, fit, group_lasso_offdiag, load_splits  # noqa: E402

HIDDEN = 1024
LAMBDA = 0.01
EPOCHS = 60


class DeepMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.fc3, self.fc4 = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        return self.fc4(torch.relu(self.fc3(h)))


def train(x_tr: np.ndarray, y_tr: np.ndarray, seed: int = 0) -> DeepMLP:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    penalty = lambda m: LAMBDA * (group_lasso_offdiag(m.fc2.weight, GROUPS)  # noqa: E731
                                  + group_lasso_offdiag(m.fc3.weight, GROUPS))
    return fit(DeepMLP(), x_tr, y_tr, seed, EPOCHS, penalty)


@torch.no_grad()
def shuffle(model: DeepMLP, seed: int = 1) -> DeepMLP:
    rng = np.random.default_rng(seed)
    p = [torch.from_numpy(rng.permutation(HIDDEN)) for _ in range(3)]
    layers = [model.fc1, model.fc2, model.fc3, model.fc4]
    for i, layer in enumerate(layers):
        w, b = layer.weight.clone(), layer.bias.clone()
        if i < 3:
            w, b = w[p[i]], b[p[i]]
        if i > 0:
            w = w[:, p[i - 1]]
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    args = ap.parse_args()
    (x_tr, y_tr), _, (x_te, y_te) = load_splits(0)
    model = shuffle(train(x_tr, y_tr))
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(2, 64),), str(args.output), dynamo=False, opset_version=OPSET,
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {args.output}: test accuracy {acc:.2%}")


if __name__ == "__main__":
    main()
