"""The platform a kernel traced now is lowered for, shared by the kernels' checks."""

from __future__ import annotations

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def traced_platform() -> str:
    """The abstract device's platform of the abstract mesh traced under (how ``jax.export``
    lowers GPU kernels for CUDA from another machine), else JAX's default backend ("cpu",
    "gpu", "tpu")."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform
