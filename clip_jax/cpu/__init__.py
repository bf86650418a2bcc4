"""CPU-host support (oneDNN matmuls, allocator settings): imported only by entry points and the
benchmark, never by the model, the step or the input pipeline."""
