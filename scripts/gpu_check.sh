#!/usr/bin/env bash
# fedtune's GPU checks (issue 13), in ONE run on the GPU test machine. See docs/gpu.md and
# ../shared/gpu/README.md (the verified recipe this follows).
#
# Here, in the project root, first:
#   bash ../shared/gpu/wheels.sh --with ray,bitsandbytes,minilm,newsgroups
# There, one command per carry folder, back to back (each takes its folder along):
#   mkdir -p /tmp/stage && cp -r .gpu/cK /tmp/stage/
# and in the last one (timeout_s 540; what comes back: $OUT/summary.txt, benchmarks.md, gpu-check.tgz):
#   cp -r .gpu/cN /tmp/stage/ && bash scripts/gpu_check.sh
#
# Steps (each logged to <step>.log, a line each in summary.txt; the device tool brings back at most
# 8 files from $OUT, so everything is packed into $OUT/gpu-check.tgz at the end, with summary.txt
# and benchmarks.md beside it):
#   1. pytest -m gpu (tests/test_gpu.py): model/optimizer/batches on cuda, bf16 autocast with fp32
#      adapters, nf4 + int8 QLoRA steps lower the loss, a quantized classifier keeps its head,
#      the client-gpus memory cap, a real OOM fails only its handler;
#   2. bench/gpu.py --quick: fedtune vs plain peft per shape, 4 virtual clients sharing the GPU
#      (client-gpus = 0.25) and the same 4-client federation on CPU (writes $OUT/benchmarks.md);
#   3. asserts on that 4-client GPU federation: every client on cuda with a nonzero gpu_peak_mib,
#      no failure, accuracy within 0.05 of the CPU run;
#   4. a QLoRA causal-lm federation (nf4 base, 4 clients sharing the GPU) on a config-built
#      tiny Llama: perplexity must fall; then `fedtune export` merges into the fp32 base (parity gate).
# GPU_CHECK_ONLY="bench qlora ..." runs only the steps named (install always runs);
# GPU_CHECK_SECONDS bounds the whole script (default 470 s).
set -uo pipefail
FINAL=${OUT:-/tmp/gpu-check}
OUT=/tmp/gpu-check-work  # every log and run folder; packed into $FINAL on exit
mkdir -p "$OUT" "$FINAL"
pack() {
  cp "$OUT/summary.txt" "$FINAL/" 2>/dev/null
  cp "$OUT/benchmarks.md" "$FINAL/" 2>/dev/null
  tar czf "$FINAL/gpu-check.tgz" --exclude='*.safetensors' --exclude='*.onnx' --exclude='*.bin' -C "$OUT" . 2>/dev/null
}
trap pack EXIT
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
status=0
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))  # the whole script; the device tool allows 600 s a command
step() {  # step NAME SECONDS CMD...: run with a timeout (never past DEADLINE), log its output and exit status
  local name=$1 limit=$2 t rc left
  shift 2
  case " install ${GPU_CHECK_ONLY:-$name} " in *" $name "*) ;; *) return 0;; esac  # a rerun of some steps
  t=$(date +%s)
  left=$(( DEADLINE - t ))
  [ "$left" -ge 15 ] || { log "$name: SKIPPED (time is up)"; status=1; return 1; }
  [ "$limit" -le "$left" ] || limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  log "$name: rc=$rc in $(( $(date +%s) - t )) s"
  [ "$rc" -eq 0 ] || { status=1; tail -n 25 "$OUT/$name.log"; }
  return $rc
}

last=$(ls -d /tmp/stage/c* 2>/dev/null | sort -V | tail -n 1)
[ -n "$last" ] || { log "no /tmp/stage/c*: carry the wheel folders first"; exit 2; }
step install 120 bash "$last/install.sh" || exit 1
export PYTHONPATH=/tmp/site:$PWD FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  RAY_DEDUP_LOGS=0 PYTHONWARNINGS=ignore
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as m
for p in ("torch", "transformers", "peft", "flwr", "ray", "bitsandbytes", "opacus"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "MISSING")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
EOF
cat "$OUT/versions.txt" >> "$OUT/summary.txt"

# 1. GPU-only tests
step pytest-gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py

# 2. the benchmark: its 4-client GPU and CPU federations are also step 3's evidence
step bench 220 python3 bench/gpu.py --quick --steps 8 --runs "$OUT/runs" --write "$OUT/benchmarks.md"

# 3. 4 virtual clients sharing one GPU
step fed-assert 30 python3 - "$OUT/runs" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = [json.loads(x) for x in (runs / "fed-cuda-4" / "metrics.jsonl").read_text().splitlines()][1:]
cpu = json.loads((runs / "fed-cpu-4" / "summary.json").read_text())
gpu = json.loads((runs / "fed-cuda-4" / "summary.json").read_text())
for r in rows:
    devs = r["client_devices"]
    print("round", r["round"], [(c["client"], c["device"], c.get("gpu_peak_mib")) for c in devs], r["failures"])
    assert len(devs) == 4 and all(c["device"].startswith("cuda") and c["gpu_peak_mib"] > 0 for c in devs), devs
    assert not r["failures"], r["failures"]
print(f"accuracy gpu {gpu['final_accuracy']:.4f} cpu {cpu['final_accuracy']:.4f}")
assert abs(gpu["final_accuracy"] - cpu["final_accuracy"]) <= 0.05
EOF

# 4. QLoRA causal-lm on a config-built tiny Llama (MiniLM's tokenizer; chatterbot dialogs)
step fixture 60 python3 - <<'EOF'
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from fedtune.modeling import load_tokenizer
tok = load_tokenizer("minilm")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained("/tmp/fixture/tiny-llama")
tok.save_pretrained("/tmp/fixture/tiny-llama")
EOF
step qlora 120 python3 -m fedtune simulate --preset llm --set model=/tmp/fixture/tiny-llama --set base-quant=nf4 \
  --set device=cuda --set server-device=cuda --set client-gpus=0.25 --set client-cpus=2 --set rounds=3 \
  --set lr=5e-3 --set gradient-checkpointing=true --out "$OUT/qlora"
step qlora-assert 30 python3 - "$OUT/qlora" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
print("perplexity", [round(r["perplexity"], 2) for r in rows])
print("clients", rows[-1]["client_devices"])
assert s["final_perplexity"] < s["initial_perplexity"]
assert all(c["device"].startswith("cuda") and c["gpu_peak_mib"] > 0 for c in rows[-1]["client_devices"])
EOF
step qlora-export 60 python3 -m fedtune export "$OUT/qlora" --out /tmp/fixture/qlora-export
cp /tmp/fixture/qlora-export/export_report.json "$OUT/qlora-export-report.json" 2>/dev/null

log "done: status=$status"
exit $status
