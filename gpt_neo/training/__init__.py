"""Training: the step (loss, gradients, microbatches), the trainer's sharded state, the loop
(checkpoints, preemption, evaluation), objectives, optimizers, metrics and the memory model;
`checkpoint/` keeps and verifies checkpoints and guards `model_path` with the run lock."""
