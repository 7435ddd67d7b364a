"""Files or hub datasets -> tokenized, packed, memory-mapped rows of the target length; PoSE
positions; data-file records checked where they enter."""
