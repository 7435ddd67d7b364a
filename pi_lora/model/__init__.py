"""What the recipe means for a model: loading the base, rope plans, LongRoPE factors, S2-Attn,
the base's weights read tensor by tensor, known models' configs, what serving clients read."""
