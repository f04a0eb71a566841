"""RMN training recipes (issue 3, in progress): the steps of the four-step schedule.

Done: step 2, `clone_procedures` (parameters and optimizer state), and step 3,
`init_memories` (k-means over stage-input keys). Stem training, routed training, data,
presets and the `train` command are not written yet.
"""

from .cloning import clone_procedures
from .memory_init import MemoryInitError, collect_keys, init_memories, kmeans_centres

__all__ = ["MemoryInitError", "clone_procedures", "collect_keys", "init_memories", "kmeans_centres"]
