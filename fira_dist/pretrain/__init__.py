"""Pretraining entry point: LLaMA model configs (``models``) and the data layer (``data``)."""
