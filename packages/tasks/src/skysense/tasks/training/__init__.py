"""Pre-training as composable parts (torchtitan's habit): the student/teacher meta-architecture,
the optimizer and its schedules, distributed wrapping, checkpoints, the linear probe, and the
loop that ties them together, short and read top to bottom."""
