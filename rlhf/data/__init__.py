"""Prompts and pairs for the RLHF family: a generated arithmetic task with an exact reward
(`arithmetic`), its character tokenizer (`chars`), and local jsonl/parquet files (`files`)."""
