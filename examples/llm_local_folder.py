"""An LLM from a local model folder: federated instruction tuning, QLoRA when a GPU is there.

    python examples/llm_local_folder.py /models/my-llama        # any AutoModelForCausalLM folder
    python examples/llm_local_folder.py                         # the bundled SmolLM2-135M-Instruct

The folder needs config.json, the weights and the tokenizer files (what ``save_pretrained``
writes); nothing is downloaded. On a CUDA machine the frozen base is loaded in 4-bit NF4
(QLoRA: bitsandbytes) and each simulated client gets a quarter of the GPU; on a CPU it
trains in fp32. The dialogs are the bundled chatterbot corpus (the llm preset).
"""

import sys

import torch

import fedtune

args = [a for a in sys.argv[1:] if "=" not in a]
overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
model = args[0] if args else "smollm2"

gpu = {"base-quant": "nf4", "client-gpus": 0.25} if torch.cuda.is_available() else {}
run = fedtune.simulate(preset="llm", model=model, **{"rounds": 2, "target-modules": "q_proj,v_proj", **gpu,
                                                     **overrides})

for row in run.metrics:
    print(f"round {row['round']}: perplexity {row['perplexity']:.2f}")
print("generations per round:", run.path / "generations.jsonl")
