"""rinha: a payment intermediary for Rinha de Backend 2025 (see README.md for the process map)."""
