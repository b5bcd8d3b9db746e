"""DHSA reference implementation. Engine core: patch.py, config.py, selection.py, attention.py; kernels/ (Triton
sparse attention), methods/ (the method table; dhsa/, baselines/); models/ (loading, stand-ins); runs/ (results
files, flags, sharding, generation); bench/ (benchmark helpers)."""
