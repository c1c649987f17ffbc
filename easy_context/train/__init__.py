"""The training job's parts: config, data, optimizer, LR schedule, loop, checkpoints, run log and lock, process
start and stop.
"""
