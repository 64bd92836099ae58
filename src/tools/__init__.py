"""Commands that use a trained model: ONNX export (tools.export) and image upscaling (tools.upscale)."""
