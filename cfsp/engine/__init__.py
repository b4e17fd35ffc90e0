"""The pruning engine: pure tensor steps on a loaded model, in the order they run.

  target.py       the model resolved once: adapter, blocks, dense geometry
  stream.py       the block loop: calibration activations through one block at a time
  statistics.py   what the loop collects per block (moments of o/down inputs, angular distance)
  capture.py      one pass of the loop over the dense model -> `Statistics`
  importance.py   fine criteria: a score per FFN channel and attention head
  allocate.py     coarse allocations: how many heads / channels each block keeps for a budget
  slicing.py      select the kept indices from scores and counts; slice a block's weights
  reconstruct.py  fold the pruned inputs of o_proj / down_proj into the kept ones (LIAR, bias)
  plan.py         the plan types (Geometry, BlockCounts, BlockPlan, PrunePlan)
  driver.py       plan_pruning and prune_model: the steps above, block by block
  registry.py     criteria, allocations and reconstructions by name (what configs may name)
  streamed*.py    the block-streamed engine (`cfsp prune --stream`): weights read, pruned and
                  written one block at a time from a safetensors folder, the steps above reused

Importing this package imports nothing heavy; each module imports torch itself.
"""
