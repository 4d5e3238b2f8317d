"""textinv_core: host-independent Textual Inversion engine (Gal et al., ICLR 2023).

Importing this package is cheap: submodules load torch/diffusers only when used. It never
imports ComfyUI or A1111 code; host adapters live in `textinv_core.hosts`.
"""

__version__ = "0.1.0"
