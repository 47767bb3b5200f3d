"""Kafka plumbing: client security, topics, settings, secrets, start-up checks."""
