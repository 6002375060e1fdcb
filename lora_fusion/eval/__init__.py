"""Evaluation helpers: labelled text tasks and their data readers, a small MiniLM classifier and its training loop, the
merge testbed and result tables. The studies that use them (the demo's evaluation, the merge-quality table) live in
`experiments/` at the repository root."""
