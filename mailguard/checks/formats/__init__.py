"""Byte-level file format sniffers, one module per family (entry: checks.fileformats)."""
