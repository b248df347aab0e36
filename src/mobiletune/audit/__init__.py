"""The data audit: duplicates, leaks across splits, likely label errors and off-topic images."""
