"""The commands besides training: over finished runs (make_table: nlsr-table, paper_table: nlsr-paper-table,
make_figures: nlsr-figures) and over trained models (export: nlsr-export to ONNX, upscale: nlsr-upscale). Each
module's `run(argv)` does the work and `main(argv)` is its command, through nlsr.cli's one bootstrap; from a
checkout without installing, `python -m nlsr.tools.<name>` with src/ on the path."""
