"""dfq: data-free quantization of PyTorch CNNs (ZeroQ, DSG, Genie) as a library, in layers.

The library never reads params.yaml or argv; the thin scripts in ``stages/`` do that and call it. Importing
``dfq`` imports nothing else: every DVC stage depends on the code it imports and no more (dvc.yaml's deps are
each stage's import closure), so the entry points are named here, not imported.

Entry points, bottom to top:

- primitives: ``dfq.cells`` (parse_bits, parse_mixed, parse_cell, set_name, cell_name), ``dfq.io`` (save_torch,
  load_torch: weights_only, atomic_dir), ``dfq.tracing`` (executed_modules, bn_layers), ``dfq.provenance``
  (environment, code_files, scratch_key);
- the float side: ``dfq.fp32.models`` (build_model, load_checkpoint), ``dfq.fp32.datasets`` (InputSpec,
  prepare_fashion_mnist, prepare_image_folders), ``dfq.fp32.train`` (TrainConfig, train_classifier),
  ``dfq.fp32.evaluate`` (evaluate, split_accuracy);
- generation: ``dfq.generation.generators`` (ZeroQConfig, DSGConfig, zeroq_batch, dsg_batch),
  ``dfq.generation.genie`` (GenieConfig, GenieDSGConfig, genie_batch),
  ``dfq.generation.sources`` (source_config, generate_batch, real_subset), ``dfq.generation.sharding``
  (make_set), ``dfq.generation.diversity`` (diagnose);
- quantization: ``dfq.quant.prepare`` (QuantSpec, prepare, calibrate, load_quantized), ``dfq.quant.observers``
  (ObserverConfig), ``dfq.quant.bias`` (round_biases), ``dfq.quant.reconstruction`` (ReconConfig, reconstruct),
  ``dfq.quant.genie_m`` (GenieMConfig, genie_spec),
  ``dfq.quant.finetune`` (FinetuneConfig, finetune), ``dfq.quant.sensitivity`` (measure, allocate_cell);
- deployment: ``dfq.deploy.qdq`` (to_onnx), ``dfq.deploy.runtime`` (session, evaluate_onnx, integer_report),
  ``dfq.deploy.quant_map`` (quant_map);
- the pipeline: ``dfq.pipeline.schema`` (validate, Params), ``dfq.pipeline.paths``, ``dfq.pipeline.report``,
  ``dfq.pipeline.plots``, ``dfq.pipeline.runs``, ``dfq.pipeline.tracking``.
"""

__version__ = "0.1.0"
__all__ = ["cells", "io", "tracing", "provenance", "fp32", "generation", "quant", "deploy", "pipeline"]
