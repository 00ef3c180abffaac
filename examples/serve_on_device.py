"""An exported model served on a device: ONNX, onnxruntime, no torch at inference.

    python examples/serve_on_device.py runs/sim-...     # export a finished run
    python examples/serve_on_device.py                  # train the quick preset first

``fedtune.export`` merges the run's adapter into the base, exports fp32 and int8 ONNX models
and checks them against torch; ``fedtune.EdgeClassifier`` is all a device needs (numpy,
tokenizers, onnxruntime), copy the folder there.
"""

import sys

import fedtune

run = fedtune.load_run(sys.argv[1]) if len(sys.argv) > 1 else fedtune.simulate(preset="quick", rounds=2)
out = run.path / "edge"
report = fedtune.export(run, out, int8=True, examples=64, latency_runs=10)
print(f"exported to {out}: fp32 accuracy {report['verification']['fp32']['accuracy']:.4f}, "
      f"int8 accuracy {report['verification']['int8']['accuracy']:.4f}")

clf = fedtune.EdgeClassifier.int8(out)  # on the device: onnxruntime only
texts = ["The new graphics card renders the game at 120 frames per second.",
         "The pitcher threw a perfect game last night."]
for text, (label, prob) in zip(texts, clf.predict(texts)):
    print(f"{label:>28}  {prob:.3f}  {text}")
