"""Command-line tools: cli, demo, simulator, dataset replay, producer, erasure, embedded broker."""
