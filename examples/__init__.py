"""Recipes: one analytics job per engine over the callbacks the bridge wrote, all computing the same answers.

Run them from the repository's root as modules (`python -m examples.duckdb_job events.jsonl`); see
`examples/README.md`.
"""
