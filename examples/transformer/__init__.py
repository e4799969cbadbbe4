"""A small transformer encoder classifying sklearn digits as sequences of pixel rows."""
