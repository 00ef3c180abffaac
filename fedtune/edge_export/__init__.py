"""Edge export: merged model to ONNX, verified in onnxruntime."""
