"""Quantization: fake-quant modules and observers (torch.ao names), prepare under the zeroq or brecq protocol
(QuantSpec), int32 biases, AdaRound/BRECQ/QDrop/Genie-M reconstruction, fine-tuning and per-layer sensitivity. Imports
only the primitives, never the float side or generation."""
