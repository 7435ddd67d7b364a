"""`pi-lora search`: LongRoPE factors searched with the evaluator's perplexity."""
