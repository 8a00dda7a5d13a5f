"""What every rank runs to train: the trainer's stages and loop (trainer), its hooks, the
compiled step, evaluation, the task, models, the LR schedule, checkpoints, rank 0's writers,
the step log and the finished model's export."""
