"""DHSA engine: attention kernels, methods, model loading and patching."""
