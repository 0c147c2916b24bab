"""Deployment of a calibrated cell: the torch-side export module, ONNX QDQ as named graph passes, ONNX Runtime
evaluation and the quantization map. Sits above quantization."""
