"""Data in and out: the output store, the score table, corpus listing and image decoding."""
