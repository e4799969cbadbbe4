"""A character-level LSTM language model on the standard library's docstrings."""
