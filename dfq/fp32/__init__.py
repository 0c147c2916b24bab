"""The float side: the models that are quantized, the datasets they are judged on, training the embedded model and
top-1/top-5 evaluation. Imports only the primitives (dfq.io, dfq.tracing), never generation or quantization."""
