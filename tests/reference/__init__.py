"""Independent PyTorch references used only by the tests."""
