"""Running episodes: batching, progress, resume, the SQLite result store."""
