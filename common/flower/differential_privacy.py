"""Flower 1.42's clipping helpers, shared by central DP (server/dp.py) and local DP (client/local_dp.py)."""

from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

__all__ = ["compute_clip_model_update", "get_norm"]
