"""Names in a bundle's ONNX graphs that the export stage writes and the runtime patches.

Each adaptable weight is one initializer ``<module>.weight_t`` holding ``W0.T``
(``in x out``), the right operand of exactly one ``MatMul``; its bias, if any, is the
initializer ``<module>.bias`` added right after. The ``lora`` graph variant adds four inputs
per weight, ``<init>.lora_A`` (``in x r``), ``<init>.lora_B`` (``r x out``),
``<init>.lora_scale`` and ``<init>.lora_bias`` (``out``), computing
``(y + (x @ A) @ B) * scale + bias_delta`` after that ``MatMul`` (docs/export.md).
"""

from __future__ import annotations

WEIGHT_SUFFIX = ".weight_t"
BIAS_SUFFIX = ".bias"
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
LORA_SCALE_SUFFIX = ".lora_scale"  # (out,) row scale after the update (DoRA), default 1
LORA_BIAS_SUFFIX = ".lora_bias"    # (out,) bias delta, default 0


def initializer_name(module_name: str) -> str:
    """The initializer of an adaptable weight of module ``module_name``."""
    return module_name + WEIGHT_SUFFIX


def lora_slot_names(init_name: str) -> tuple[str, str]:
    """Input names of the two LoRA slots attached to initializer ``init_name``."""
    return init_name + LORA_A_SUFFIX, init_name + LORA_B_SUFFIX


def bias_name(module_name: str) -> str:
    """The initializer of an adaptable layer's bias."""
    return module_name + BIAS_SUFFIX


def lora_extra_slot_names(init_name: str) -> tuple[str, str]:
    """Input names of the row-scale and bias-delta slots of initializer ``init_name``."""
    return init_name + LORA_SCALE_SUFFIX, init_name + LORA_BIAS_SUFFIX
