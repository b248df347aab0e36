"""Data: find the images under DATA_DIR (class folders or a labels CSV), hash and split them by content, decode
them."""
