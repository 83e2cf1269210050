"""Converge's plug-in examples: your own LightningModule and data, swept by Converge.

Put the directory that holds this package on the path (`PYTHONPATH=examples`, or run from
`examples/`), then name the factories in a spec:

- `converge_examples.shapes:build_model` / `converge_examples.shapes:build_data`: a small CNN on
  generated images of shapes (the GPU reference workload; `examples/shapes-cnn.yaml`).
- `converge_examples.tabular:build_model` / `converge_examples.tabular:build_data`: a regression
  MLP with its own LightningDataModule reading a CSV (`examples/tabular-regression.yaml`).
"""
