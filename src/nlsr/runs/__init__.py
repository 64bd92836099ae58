"""The experiment folder of a run: lock, log, config.txt, results.json and the evaluation records, the loss
log and plots, live progress, TensorBoard, timers."""
