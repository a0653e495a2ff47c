"""Deployable artifacts: packed models, the compact elastic checkpoint, external formats."""
