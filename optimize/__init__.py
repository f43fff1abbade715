"""Model compression recipes (quantize, prune, distill, low-rank, share).

Empty until the optimize job lands; `actors.loading.load_model` is the seam that will
load its artifacts.
"""
