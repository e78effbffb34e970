"""Data tooling: `preprocess` turns JSON-lines text into Megatron-Core's mmap `.bin`/`.idx`."""
