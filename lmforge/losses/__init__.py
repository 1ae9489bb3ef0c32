"""Pure loss functions: tensors in, (loss, metrics) out; no modules, no trainer state."""
