"""The one exception type lorax_fn raises for bad input."""


class LoraError(ValueError):
    """Bad input to lorax_fn; the message names the offending path, shape or value.

    Example:
        >>> try:
        ...     raise LoraError("params/Dense_0/kernel: rank 9 > min(fan_in, fan_out) = 4")
        ... except ValueError as e:
        ...     print(e)
        params/Dense_0/kernel: rank 9 > min(fan_in, fan_out) = 4
    """
