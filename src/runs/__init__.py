"""The experiment folder of a run: lock, log, config.txt, results.json, plots, live progress, TensorBoard,
timers."""
