"""Policies, trainer, safety model and inference runner (see DESIGN.md)."""
