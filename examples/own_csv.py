"""Your own data: a CSV with a text and a label column (optional: group, split).

    python examples/own_csv.py my_posts.csv          # columns text,label
    python examples/own_csv.py                       # writes and uses a small demo CSV

Each client gets a Dirichlet(0.5) share of the labels; rows with split=test (or a seeded 20%)
are the server's test set. Other column names: text_column=..., label_column=...
"""

import random
import sys
from pathlib import Path

import fedtune

args = [a for a in sys.argv[1:] if "=" not in a]
overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)

if args:
    csv = Path(args[0])
else:  # a demo: three topics, each with its own words
    csv = Path("demo_posts.csv")
    words = {"sport": "match goal team score win league coach", "tech": "chip code cpu software bug compile",
             "food": "recipe bake flour oven taste spicy dinner"}
    rng = random.Random(0)
    lines = ["text,label"] + [f"{' '.join(rng.choices(w.split(), k=8))},{label}"
                              for label, w in words.items() for _ in range(120)]
    csv.write_text("\n".join(lines) + "\n")

run = fedtune.simulate(preset="quick", dataset=str(csv), **{"rounds": 2, "train-size": 0, "eval-size": 0,
                                                              **overrides})
labels = (run.adapter / "labels.json").read_text()
print(f"{csv}: accuracy {run.metrics[0]['accuracy']:.3f} (round 0) -> {run.metrics[-1]['accuracy']:.3f} "
      f"(round {run.metrics[-1]['round']}); labels {labels}; run in {run.path}")
