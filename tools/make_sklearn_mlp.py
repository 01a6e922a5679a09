"""A scikit-learn MLPClassifier (two hidden layers of 512) trained on digits, exported with skl2onnx.

Needs scikit-learn and skl2onnx (tools only, not dependencies of onnx_split:
``.venv/bin/pip install scikit-learn skl2onnx``). The data split is the shipped digits models' one
(models/README.md): ``load_digits`` pixels / 16, ``train_test_split`` twice with
``random_state=0`` into 60 % train, 20 % calibration, 20 % test; the calibration and test splits
are the shipped ``models/digits_calibration.npz`` and ``models/digits_test.npz`` (the same rows,
written under the exported model's input name). Training is seeded (``random_state=0``).

    .venv/bin/python tools/make_sklearn_mlp.py build/sklearn_mlp.onnx

writes the model, ``<stem>_calibration.npz``, ``<stem>_test.npz`` and ``<stem>_seen.npz`` (the
1,078 training rows and the 359 calibration rows together: every row that is not a test row, the
larger calibration set a lossy split can fit and check on) beside it, and prints the test accuracy of
scikit-learn's own predictions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(output: Path) -> float:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=0.6, stratify=y, random_state=0)
    x_cal, x_test, y_cal, y_test = train_test_split(x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(512, 512), max_iter=300, random_state=0)
    clf.fit(x_train, y_train)
    model = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.SerializeToString())
    name = model.graph.input[0].name
    np.savez(output.with_name(output.stem + "_calibration.npz"), **{name: x_cal})
    np.savez(output.with_name(output.stem + "_test.npz"), **{name: x_test}, labels=y_test)
    np.savez(output.with_name(output.stem + "_seen.npz"), **{name: np.concatenate([x_train, x_cal])})
    return float((clf.predict(x_test) == y_test).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    args = ap.parse_args()
    accuracy = make(args.output)
    print(f"wrote {args.output}: scikit-learn test accuracy {accuracy:.2%}")


if __name__ == "__main__":
    main()
