"""Generated task families with strict verifiers (arithmetic, countdown, list_ops)."""

from k2sys.tasks.arithmetic import Arithmetic
from k2sys.tasks.base import (HELDOUT_PERCENT, SPLITS, Task, TaskFamily, get_family, list_families,
                              register_family, split_of)
from k2sys.tasks.countdown import Countdown, evaluate_expression
from k2sys.tasks.transforms import ListOps

__all__ = ["Arithmetic", "Countdown", "ListOps", "Task", "TaskFamily", "get_family", "list_families",
           "register_family", "split_of", "evaluate_expression", "SPLITS", "HELDOUT_PERCENT"]
