"""Layers shared by the architectures in `models/`."""
