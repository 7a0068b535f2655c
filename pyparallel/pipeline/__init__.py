"""Layer-split model parallelism: a model cut into contiguous stages that process micro-batches in turn.

- :class:`Pipeline`: one process, each stage on its own device (CUDA streams overlap the stages).
- :class:`DistributedPipeline`: one stage per rank, activations and gradients sent point-to-point,
  GPipe or 1F1B schedules; with more ranks than stages, a (stage, replica) :class:`ProcessGrid` whose
  data groups average each stage's gradients through a DDP-style communication hook.
- :func:`split_stages`, :func:`balance_by_params`: how the model is cut.
- :class:`SavedActivationMeter`: activation memory kept for backward, on any device.

Example (on every rank of a 2-rank Gloo group)::

    pipe = pyparallel.pipeline.DistributedPipeline(model, F.cross_entropy, balance=[2, 2], n_microbatches=8)
    loss = pipe.step(x, y)   # the loss on the last stage, None on the first
"""

from .distributed import DistributedPipeline
from .grid import ProcessGrid
from .handshake import PipelineError
from .local import Pipeline
from .memory import SavedActivationMeter
from .partition import balance_by_params, split_stages
from .schedule import SCHEDULES, stage_actions

__all__ = ["DistributedPipeline", "Pipeline", "PipelineError", "ProcessGrid", "SCHEDULES", "SavedActivationMeter",
           "balance_by_params", "split_stages", "stage_actions"]
