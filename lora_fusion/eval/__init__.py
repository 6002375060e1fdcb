"""Evaluation helpers: labelled text tasks, a small MiniLM text classifier and the quickstart demo."""
