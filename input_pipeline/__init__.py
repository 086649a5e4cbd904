"""Data sources for training and tests: built-in phantoms and the MNI152 case."""
