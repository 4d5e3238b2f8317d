"""A toy world where textual inversion can be measured: scenes, a scorer, a small model, a benchmark.

No pretrained text-to-image weights exist on our machines, so "does the learned word capture the
concept?" is asked of a small model trained on rendered scenes whose attributes a deterministic
scorer can read back. Nothing here is imported at pack import time (ComfyUI logs import times).
"""
