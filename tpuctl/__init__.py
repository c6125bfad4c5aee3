"""tpuctl: create, drive and babysit Cloud TPU pods, and train JAX models on them."""

__version__ = "0.1.0"
