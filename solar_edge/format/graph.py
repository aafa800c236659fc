"""Names in a bundle's ONNX graphs that the export stage writes and the runtime patches.

Each adaptable weight is one initializer ``<module>.weight_t`` holding ``W0.T``
(``in x out``), the right operand of exactly one ``MatMul``. The ``lora`` graph variant adds
two inputs per weight, ``<init>.lora_A`` (``in x r``) and ``<init>.lora_B`` (``r x out``),
with ``y + (x @ A) @ B`` after that ``MatMul`` (docs/export.md).
"""

from __future__ import annotations

WEIGHT_SUFFIX = ".weight_t"
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"


def initializer_name(module_name: str) -> str:
    """The initializer of an adaptable weight of module ``module_name``."""
    return module_name + WEIGHT_SUFFIX


def lora_slot_names(init_name: str) -> tuple[str, str]:
    """Input names of the two LoRA slots attached to initializer ``init_name``."""
    return init_name + LORA_A_SUFFIX, init_name + LORA_B_SUFFIX
