"""Evaluation helpers: labelled text tasks, a small MiniLM classifier, the quickstart demo."""
