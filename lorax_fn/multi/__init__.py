"""Many adapters for one base: stacks, mixed-adapter batches, hot swap, and combining.

:func:`stack_adapters` / :func:`stack_checkpoints` build an :class:`AdapterStack`;
:func:`multi_lora` runs a batch in which each example picks its adapter (gathered or
grouped); :func:`select_adapters` gathers once for many calls; :func:`replace_adapter`
swaps one without recompiling; :func:`combine` merges adapters into one (PEFT's
``add_weighted_adapter`` methods: cat, svd, linear, TIES, DARE, magnitude pruning), by
the rules of :func:`merge_task_tensors`.
"""

from lorax_fn.multi.combine import combine
from lorax_fn.multi.merging import merge_task_tensors
from lorax_fn.multi.stack import (
    AdapterSelection,
    AdapterStack,
    multi_lora,
    replace_adapter,
    select_adapters,
    stack_adapters,
    stack_checkpoints,
)

__all__ = [
    "AdapterSelection",
    "AdapterStack",
    "combine",
    "merge_task_tensors",
    "multi_lora",
    "replace_adapter",
    "select_adapters",
    "stack_adapters",
    "stack_checkpoints",
]
