"""Train two small real MLPs on scikit-learn's bundled digits data and export them to ONNX.

    pip install torch==2.13.0 scikit-learn      # plus onnx and onnxruntime for the checks
    python tools/train_digits.py                 # defaults write the files shipped in models/

Why: onnx_split splits MatMul/Gemm weights into block-diagonal parts (after permuting rows and
columns) and drops what lies outside the blocks. The other example model (mlp_blocks.onnx) has
exact, synthetic blocks; these two are trained networks, so the tool can be tried on weights it
did not make up, and the effect of dropping weights can be measured as held-out accuracy.

Data: sklearn.datasets.load_digits (1797 images of 8x8 pixels, values 0..16, shipped with
scikit-learn, no download), scaled to [0, 1]. A fixed stratified split: 60 % train, 20 %
calibration, 20 % test. Written next to the models:
  digits_calibration.npz  pixels float32 [n, 64]  (samples a user would hand to the tool;
                          the array name equals the ONNX graph input name)
  digits_test.npz         pixels float32 [n, 64], labels int64 [n]  (held-out accuracy)
The train split is not written.

Models: 64 -> 1024 -> ReLU -> 1024 -> ReLU -> 10 (nn.Linear fc1, fc2, fc3), Adam on cross-entropy
with minibatches, seeded and deterministic (one thread).
  digits_mlp    plain training (small weight decay).
  digits_block  the same, plus a group-lasso penalty on fc2: the 1024 units of each hidden layer
                are cut into G = 8 groups of 128, fc2's weight into 8 x 8 tiles, and
                lambda * (sum of the Frobenius norms of the 56 off-diagonal tiles) is added to the
                loss. Plain (sub)gradient steps through Adam, no proximal step, so the off-diagonal
                tiles become small but not exactly zero: a realistic "almost block-diagonal" layer.
                Afterwards the units of each hidden layer are shuffled with a seeded permutation
                (fc1's output rows and bias, fc2's rows, columns and bias, fc3's columns), which
                leaves the network's function unchanged (checked) but hides the blocks from the
                index order, so the tool has to find the permutation itself.

Export: the classic TorchScript exporter (dynamo=False) with opset 17, which writes Gemm nodes
with constant initializers (IR version 8), weights inside the file. Input "pixels" [batch, 64],
output "logits" [batch, 10]. After export, the file is checked with onnx.checker (full_check),
onnxruntime's outputs are compared with torch's on the test split, and test accuracy is measured
in onnxruntime. Figures go to digits_training.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN = 1024
GROUPS = 8
BLOCK_LAMBDA = 1e-2
LR = 1e-3
WEIGHT_DECAY = 1e-4
BATCH = 64
OPSET = 17


def load_splits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=0.6, stratify=y, random_state=seed)
    x_cal, x_te, y_cal, y_te = train_test_split(x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=seed)
    return (x_tr, y_tr), (x_cal, y_cal), (x_te, y_te)


class MLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def offdiag_mask(groups_out: np.ndarray, groups_in: np.ndarray) -> np.ndarray:
    """True where a weight [out, in] connects units of different groups."""
    return groups_out[:, None] != groups_in[None, :]


def offdiag_share(w: np.ndarray, groups_out: np.ndarray, groups_in: np.ndarray) -> float:
    a = np.abs(w.astype(np.float64))
    return float(a[offdiag_mask(groups_out, groups_in)].sum() / a.sum())


def group_lasso_offdiag(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of the Frobenius norms of the off-diagonal tiles of w [out, in] (contiguous groups)."""
    o, i = w.shape
    tiles = w.reshape(groups, o // groups, groups, i // groups)
    norms = torch.sqrt((tiles * tiles).sum(dim=(1, 3)) + 1e-12)  # [groups, groups]
    return norms.sum() - norms.diagonal().sum()


def fit(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray, seed: int, epochs: int, penalty=None) -> nn.Module:
    """Adam with cosine decay on cross-entropy in seeded minibatches, plus ``penalty(model)`` (a
    loss term) when given; the recipe every digits model here is trained with."""
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(x_tr) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=LR * 0.01)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), BATCH):
            idx = order[s:s + BATCH]
            loss = loss_fn(model(xt[idx]), yt[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train(data, seed: int, epochs: int, lam: float) -> MLP:
    (x_tr, y_tr) = data
    torch.manual_seed(seed)
    penalty = (lambda m: lam * group_lasso_offdiag(m.fc2.weight, GROUPS)) if lam else None
    return fit(MLP(), x_tr, y_tr, seed, epochs, penalty)


@torch.no_grad()
def permute_hidden(model: MLP, p1: np.ndarray, p2: np.ndarray) -> MLP:
    """New hidden unit i of layer 1 is old unit p1[i] (likewise p2 for layer 2)."""
    out = MLP()
    a, b = torch.from_numpy(p1), torch.from_numpy(p2)
    out.fc1.weight.copy_(model.fc1.weight[a])
    out.fc1.bias.copy_(model.fc1.bias[a])
    out.fc2.weight.copy_(model.fc2.weight[b][:, a])
    out.fc2.bias.copy_(model.fc2.bias[b])
    out.fc3.weight.copy_(model.fc3.weight[:, b])
    out.fc3.bias.copy_(model.fc3.bias)
    return out.eval()


@torch.no_grad()
def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: MLP, path: Path) -> None:
    import onnx

    torch.onnx.export(
        model, (torch.zeros(2, 64),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, external_data=False,
    )
    m = onnx.load(str(path))
    if m.ir_version > 8:  # opset 17 goes with IR 8; keep the file loadable by older runtimes
        m.ir_version = 8
        onnx.save(m, str(path))
    onnx.checker.check_model(m, full_check=True)


def check_onnx(path: Path, model: MLP, x: np.ndarray, y: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"pixels": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - ref).max())
    assert diff <= 1e-4, f"{path.name}: onnxruntime differs from torch by {diff}"
    return {
        "nodes": [n.op_type for n in m.graph.node],
        "weights_are_initializers": all(n.input[1] in inits for n in m.graph.node if n.op_type in ("Gemm", "MatMul")),
        "ir_version": m.ir_version,
        "opset": [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0],
        "ort_max_abs_diff_vs_torch": diff,
        "test_accuracy_ort": float((got.argmax(1) == y).mean()),
        "file_bytes": path.stat().st_size,
    }


def fc2_from_file(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}["fc2.weight"]  # [out, in]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="models")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam", type=float, default=BLOCK_LAMBDA, help="group-lasso weight for digits_block")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_split, (x_cal, y_cal), (x_te, y_te) = load_splits(args.seed)
    np.savez(out / "digits_calibration.npz", pixels=x_cal)
    np.savez(out / "digits_test.npz", pixels=x_te, labels=y_te)

    contiguous = np.arange(HIDDEN) // (HIDDEN // GROUPS)
    record = {
        "command": " ".join(["python", "tools/train_digits.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch_version": torch.__version__,
        "data": {"source": "sklearn.datasets.load_digits, pixels / 16", "train": len(train_split[0]),
                 "calibration": len(x_cal), "test": len(x_te), "split_seed": args.seed},
        "training": {"optimizer": "Adam", "lr": LR, "lr_schedule": "cosine to lr/100", "weight_decay": WEIGHT_DECAY,
                     "batch": BATCH, "epochs": args.epochs, "seed": args.seed},
        "models": {},
    }
    for name, lam in (("digits_mlp", 0.0), ("digits_block", args.lam)):
        model = train(train_split, args.seed, args.epochs, lam)
        w2 = model.fc2.weight.detach().numpy()
        info = {
            "lambda": lam,
            "accuracy_torch": {"train": accuracy(model, *train_split), "calibration": accuracy(model, x_cal, y_cal),
                               "test": accuracy(model, x_te, y_te)},
            "fc2_offdiag_abs_share_before_shuffle": offdiag_share(w2, contiguous, contiguous),
        }
        g1 = g2 = contiguous
        if lam:
            rng = np.random.default_rng(args.seed + 1)
            p1, p2 = rng.permutation(HIDDEN), rng.permutation(HIDDEN)
            shuffled = permute_hidden(model, p1, p2)
            with torch.no_grad():
                d = float((shuffled(torch.from_numpy(x_te)) - model(torch.from_numpy(x_te))).abs().max())
            assert d <= 1e-5, f"hidden-unit shuffle changed the outputs by {d}"
            info["shuffle_max_abs_diff"] = d
            model, g1, g2 = shuffled, contiguous[p1], contiguous[p2]
        path = out / f"{name}.onnx"
        export(model, path)
        info.update(check_onnx(path, model, x_te, y_te))
        # measured on the weights as stored in the file, grouped through the known permutation
        info["fc2_offdiag_abs_share_in_file"] = offdiag_share(fc2_from_file(path), g2, g1)
        record["models"][name] = info
        print(f"{name}: test acc (ort) {info['test_accuracy_ort']:.4f}  train {info['accuracy_torch']['train']:.4f}"
              f"  cal {info['accuracy_torch']['calibration']:.4f}  fc2 off-diagonal |w| share "
              f"{info['fc2_offdiag_abs_share_in_file']:.4f}  lambda {lam:g}  {info['file_bytes']} bytes"
              f"  nodes {','.join(info['nodes'])}  IR {info['ir_version']} opset {info['opset']}")
    (out / "digits_training.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
