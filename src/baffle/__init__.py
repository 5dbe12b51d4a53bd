"""baffle: backpropagation-free federated learning (Feng et al., arXiv 2301.12195)."""
