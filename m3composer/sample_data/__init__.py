"""`m3c sample-data`: real multi-task sample data (FlagEmbedding JSONL) and a held-out BEIR split."""
