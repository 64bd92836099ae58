"""Command-line tools over finished runs (`python src/tools/<name>.py --help`)."""
