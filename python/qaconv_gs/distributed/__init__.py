"""Data- and model-parallel qaconv-gs: the class table sharded over ranks (Partial-FC style).

- `Communicator` and its backends (`SingleProcessCommunicator`, `TorchCommunicator`, `MPICommunicator`),
  `init_communicator(backend)`;
- `ShardLayout`: contiguous class ranges per rank;
- `sharded_class_neighbors`: ring-scheduled neighbour table, equal to `class_neighbors`;
- `ShardedQAConvGS`: one training step over the gathered batch, class rows sharded, equal to
  `QAConvGS.forward_backward` on the concatenated batch, and `identify` against the sharded table (each
  rank its own probes, bit-identical to `QAConvGS.identify`); `qaconv_gs.Trainer` trains it (one Trainer
  per rank, sharded trainer checkpoints) and `qaconv_gs.torch.QAConvGSLoss(comm=...)` wraps it;
- sharded checkpoints: `save_sharded`, `load_sharded`, `load_sharded_model`, `shard_checkpoint`.
"""

from .checkpoint import load_sharded, load_sharded_model, save_sharded, shard_checkpoint
from .comm import (
    Communicator,
    MPICommunicator,
    SingleProcessCommunicator,
    ThreadCommunicator,
    TorchCommunicator,
    init_communicator,
    run_threads,
)
from .layout import ShardLayout
from .model import ShardedQAConvGS, ShardedStepResult
from .neighbors import merge_topk, sharded_class_neighbors

__all__ = [
    "Communicator",
    "MPICommunicator",
    "ShardLayout",
    "ShardedQAConvGS",
    "ShardedStepResult",
    "SingleProcessCommunicator",
    "ThreadCommunicator",
    "TorchCommunicator",
    "init_communicator",
    "load_sharded",
    "load_sharded_model",
    "save_sharded",
    "shard_checkpoint",
    "merge_topk",
    "run_threads",
    "sharded_class_neighbors",
]
