"""File names of an export folder. Shared by the exporter and the torch-free runtime."""

from __future__ import annotations

MODEL_FP32 = "model.onnx"
MODEL_INT8 = "model.int8.onnx"
TOKENIZER = "tokenizer.json"
LABELS = "labels.json"
REPORT = "export_report.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
