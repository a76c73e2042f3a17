"""Tools that run beside the engine, called by the CLI and benchmarks, never imported by the pipeline:
step labels and predictor training, the ShapesWorld evaluator, 3-D export, bulk generation."""
