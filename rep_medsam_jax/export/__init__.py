"""Model directory -> verified ONNX export directory (encoder + prompt-decoder), optional int8."""
