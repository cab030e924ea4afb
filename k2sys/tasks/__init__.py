"""Generated task families with strict verifiers (arithmetic, countdown, list_ops), instruction
following, faithfulness and safety (verifiable rewards), and open-ended prompts for the rubric critic."""

from k2sys.tasks.arithmetic import Arithmetic
from k2sys.tasks.base import (HELDOUT_PERCENT, SPLITS, Task, TaskFamily, get_family, list_families,
                              register_family, split_of)
from k2sys.tasks.countdown import Countdown, evaluate_expression
from k2sys.tasks.faithfulness import Faithfulness
from k2sys.tasks.instruction import InstructionFollowing
from k2sys.tasks.open_ended import OpenEnded
from k2sys.tasks.safety import Safety
from k2sys.tasks.transforms import ListOps

__all__ = ["Arithmetic", "Countdown", "ListOps", "InstructionFollowing", "Faithfulness", "Safety", "OpenEnded",
           "Task", "TaskFamily", "get_family", "list_families", "register_family", "split_of", "evaluate_expression",
           "SPLITS", "HELDOUT_PERCENT"]
