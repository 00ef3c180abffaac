"""Your own aggregation strategy as a plugin, over clients of mixed LoRA ranks.

examples/my_strategy.py registers ``holder-avg``; here half the clients train rank-2
adapters (a "phone" profile) and half rank-8 ones (a "laptop"), and the server aggregates
them with it, through Flower's simulation runtime (each Ray actor imports the plugin too).

    python examples/plugin_strategy.py
    fedtune simulate --preset quick --set plugins=my_strategy --set strategy=holder-avg ...   # the same, CLI
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # my_strategy.py sits beside this script

import fedtune

overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
run = fedtune.simulate(
    preset="quick",
    plugins=["my_strategy"],
    strategy="holder-avg",
    profile_defs=["phone lora-rank=2", "laptop lora-rank=8"],
    profiles="phone,laptop",  # round-robin by client id
    **{"rounds": 2, **overrides},
)
saved = json.loads((run.path / "config.json").read_text())
print("strategy:", saved["strategy"], "plugins:", saved["plugins"], "profiles:", saved["profiles"])
for row in run.metrics:
    ranks = {k: f"{v:.4f}" for k, v in row.items() if k.startswith("accuracy_rank")}
    print(f"round {row['round']}: accuracy {row['accuracy']:.4f}  per rank group {ranks}")
