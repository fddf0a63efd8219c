"""Quantization algorithms (the calibration math), built on ``lowbit.ops``."""
