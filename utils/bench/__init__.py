"""Benchmark helpers: latency timing per mode (latency*.py), LongBench tables and plots, attention recall and the
selection testbed. The only utils/ modules that read data/; the engine (kernels/, methods/) never imports them."""
