"""The bundled JAX trainer: `python -m trainer RECIPE [key=value ...]`."""
