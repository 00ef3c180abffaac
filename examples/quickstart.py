"""fedtune from Python: a federation in simulation, its metrics, its run directory.

    python examples/quickstart.py                    # the quick preset: 2-layer MiniLM, 4 clients
    python examples/quickstart.py rounds=2 lr=3e-3   # any flat key as KEY=VALUE
"""

import sys

import fedtune

overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])  # e.g. rounds=2 -> rounds="2" (validated like --set)
run = fedtune.simulate(preset="quick", **{"rounds": 2, **overrides})

for row in run.metrics:  # one dict per round; round 0 is before any training
    print(f"round {row['round']}: accuracy {row['accuracy']:.4f}, loss {row['loss']:.4f}")
print("run directory:", run.path)
print("adapter (peft format):", run.adapter)
print("final accuracy:", run.summary["final_accuracy"])
