"""Adapters for the data pipelines that run tagging at cluster scale: `ray` (a callable class
for `ray.data.Dataset.map_batches`) and `spark` (a `DataFrame.mapInArrow` function). Both
take a column of image bytes or paths and add the label columns through `arrow.ArrowTagger`,
with one engine per worker process (PyTorch or ONNX Runtime)."""
