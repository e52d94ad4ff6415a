"""plerec: multi-task ranking models for recommender systems (PLE, CGC, MMoE and baselines)."""

__version__ = "0.1.0"
