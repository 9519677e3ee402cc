"""Typed errors of the runtime. Every one of them means: the input was refused, nothing written."""


class RuntimeInputError(ValueError):
    """Base class for inputs the runtime refuses before touching the pool."""


class UnsupportedModelError(RuntimeInputError):
    """A checkpoint directory that is missing files or asks for what we do not implement."""


class InvalidTokenError(RuntimeInputError):
    """A token id outside the model's vocabulary."""


class ContextLengthError(RuntimeInputError):
    """A sequence longer than the model's context window."""


class BlockTableError(RuntimeInputError):
    """A block table or slot mapping that points outside the KV pool."""


class KVPoolError(RuntimeInputError):
    """A KV pool whose dtype, shape or layout does not match the model."""


class ShapeError(RuntimeInputError):
    """A kernel argument with the wrong shape, dtype or strides."""
