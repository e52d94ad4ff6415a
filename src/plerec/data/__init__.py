"""Data in: readers, the synthetic generator, encoding into column tensors, batching."""
