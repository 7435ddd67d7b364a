"""Files or hub datasets -> tokenized, packed, memory-mapped rows of the target length; PoSE
positions; data-file records checked where they enter."""

# label of a position no loss is taken on: torch cross_entropy's default ignore_index, which
# transformers' models and peft share; the packer writes it, every loss path skips it
IGNORE_INDEX = -100
