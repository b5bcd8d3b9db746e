"""Training-free sparse-attention baselines (paper App. D, "Baselines"), one pattern per module.

Importing this package registers every baseline in `utils.registry.METHODS`:
  streaming, streaming_dilated, streaming_strided   streaming.py   sinks + (dilated / strided) local window
  vertical_slash                                     vertical_slash.py  MInference's vertical + slash lines
  block_sparse                                       block_sparse.py    top 128-token blocks by mean-pooled q/k
  quest                                              quest.py       decode-time page selection (prefill dense)
  oracle_topk                                        oracle.py      each query's true top-N_b keys (upper bound)
All are configured by one budget N_b (`density` * L or `budget`), and no query reads more than N_b keys.
"""

from . import block_sparse, oracle, quest, streaming, vertical_slash  # noqa: F401  (each registers its methods)
