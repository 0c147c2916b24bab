"""dfq: data-free quantization of PyTorch CNNs (ZeroQ, DSG) as a library.

The library never reads params.yaml or argv; the thin scripts in ``stages/`` do that and call it.
"""

__version__ = "0.1.0"
