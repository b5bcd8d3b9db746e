"""Training-free sparse-attention baselines (paper App. D, "Baselines"), one pattern per module.

Importing this package registers every baseline in `utils.methods.registry.METHODS`:
  streaming, streaming_dilated, streaming_strided   streaming.py   sinks + (dilated / strided) local window
  vertical_slash                                     vertical_slash.py  MInference's vertical + slash lines
  block_sparse                                       block_sparse.py    top 128-token blocks by mean-pooled q/k
  quest                                              quest.py       decode-time page selection (prefill dense)
  oracle_topk                                        oracle.py      each query's true top-N_b keys (upper bound)
  flexprefill                                        flexprefill.py  per head vertical-slash or query-aware blocks
                                                                     covering gamma of the attention (FlexPrefill)
  xattention                                         xattention.py  blocks by antidiagonal scores, kept up to a
                                                                    cumulative threshold (XAttention)
All but flexprefill and xattention take one budget N_b (`density` * L or `budget`), and no query reads more than N_b keys.
flexprefill and xattention run as their authors run them by default (peer_budget="adaptive"): their thresholds
alone decide how much each tile reads; with peer_budget="matched" they are capped at N_b and may stop below it.
Both record the density they reached (threshold_blocks.py: context.state["reached"], `reached_density(model)`).
"""

# each module registers its methods
from utils.methods.baselines import block_sparse, flexprefill, oracle, quest, streaming, vertical_slash, xattention  # noqa: F401
