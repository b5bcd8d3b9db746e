"""The head dimensions the Triton kernels are compiled for (the attention kernel and DHSA's fused selection): one
tensor-core tile size per power of two from 16 to 256. Any other head dim runs the PyTorch path."""

HEAD_DIMS = (16, 32, 64, 128, 256)
