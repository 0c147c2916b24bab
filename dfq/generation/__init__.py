"""Calibration data made from a model's BatchNorm statistics (ZeroQ, DSG, Genie-D) or drawn (gaussian noise, real
images), sharded and resumable, and its diversity. Imports only the primitives, never the float side or
quantization."""
