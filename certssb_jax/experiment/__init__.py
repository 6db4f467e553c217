"""One run: its config, the run folder, the pipeline of stages, the metrics and the report files."""
