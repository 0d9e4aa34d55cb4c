"""Continual learning: LoRA adapters per domain, experience replay, EWC, forgetting reports."""
