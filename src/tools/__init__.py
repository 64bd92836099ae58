"""Command-line tools: over finished runs (make_table, make_figures) and over trained models (export to
ONNX, upscale images). `python src/tools/<name>.py --help`; export and upscale also as `python src/<name>.py`."""
